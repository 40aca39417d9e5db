//! A local endpoint compatible with CoCo's Confidential Data Hub REST API (the
//! api-server-rest on `127.0.0.1:8006`), so workloads written for CoCo read their resources
//! unchanged: `GET /cdh/resource/<repo>/<type>/<tag>` answers the plaintext of the latest
//! version the daemon holds (`application/octet-stream`), 404 with a JSON body for a
//! resource it does not hold. As upstream: loopback peers only (403 otherwise), GET only
//! (405). Unlike upstream it never calls the KBS: it serves what the KBS pushed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::resource_path::ResourcePath;
use crate::store::StateStore;

/// Default listen address: CoCo's api-server-rest port, loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8006";

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    detail: String,
}

fn error(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: code,
            detail: detail.into(),
        }),
    )
        .into_response()
}

/// The CDH-compatible routes over `store`.
pub fn router(store: Arc<StateStore>) -> Router {
    Router::new()
        .route(
            "/cdh/resource/{repo}/{kind}/{tag}",
            get(resource).fallback(method_not_allowed),
        )
        .fallback(not_found)
        .with_state(store)
}

/// Delay before retrying a failed bind.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Bind `listen` and serve until `shutdown`, publishing the bound address on `addr`. A
/// failed bind (the port taken, e.g. by CoCo's own api-server-rest) is logged and retried
/// every 5 s; it never stops the daemon.
pub async fn run(
    listen: SocketAddr,
    store: Arc<StateStore>,
    addr: watch::Sender<Option<SocketAddr>>,
    shutdown: CancellationToken,
) {
    let listener = loop {
        match TcpListener::bind(listen).await {
            Ok(listener) => break listener,
            Err(e) => {
                tracing::error!(%listen, error = %e, retry_in_s = BIND_RETRY.as_secs(), "CDH endpoint cannot listen");
                let retry = tokio::time::sleep(BIND_RETRY);
                if shutdown.run_until_cancelled(retry).await.is_none() {
                    return;
                }
            }
        }
    };
    let bound = listener.local_addr().ok();
    tracing::info!(addr = ?bound, "CDH-compatible resource endpoint listening");
    addr.send_replace(bound);
    if let Err(e) = serve(listener, store, shutdown).await {
        tracing::error!(error = %e, "CDH endpoint failed");
    }
    addr.send_replace(None);
}

/// Serve the endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    store: Arc<StateStore>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(store).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn resource(
    State(store): State<Arc<StateStore>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Response {
    if !peer.ip().is_loopback() && !peer.ip().to_canonical().is_loopback() {
        tracing::warn!(%peer, "CDH request from outside the guest refused");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the CDH endpoint serves local clients only",
        );
    }
    let path = match ResourcePath::new(repo.as_str(), kind.as_str(), tag.as_str()) {
        Ok(path) => path,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                format!("resource path: {e}"),
            );
        }
    };
    let lookup = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || store.get_resource(&path)).await
    };
    match lookup {
        Ok(Ok(Some(held))) => {
            tracing::info!(uri = %path, version = held.version, "CDH resource served");
            let version = held.version.to_string();
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CACHE_CONTROL, "no-store".to_owned()),
                    (header::HeaderName::from_static("x-tether-version"), version),
                ],
                held.plaintext.to_vec(),
            )
                .into_response()
        }
        Ok(Ok(None)) => {
            tracing::info!(uri = %path, "CDH resource not held");
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("resource {path} is not held by this guest"),
            )
        }
        Ok(Err(e)) => {
            tracing::error!(uri = %path, error = %e, "CDH resource cannot be read");
            error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn method_not_allowed(request: Request) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("only GET is allowed, not {}", request.method()),
    )
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", request.uri().path()),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn start(store: Arc<StateStore>) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, store, stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn serves_the_latest_held_version_and_json_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        let path: ResourcePath = "default/app/key".parse().unwrap();
        store.apply_resource(&path, 1, b"one").unwrap();
        let (addr, stop) = start(Arc::clone(&store)).await;
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/cdh/resource/default/app/key");

        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(resp.headers()["x-tether-version"], "1");
        assert_eq!(&resp.bytes().await.unwrap()[..], b"one");

        store.apply_resource(&path, 2, b"two").unwrap();
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.headers()["x-tether-version"], "2");
        assert_eq!(&resp.bytes().await.unwrap()[..], b"two");

        let resp = http
            .get(format!("http://{addr}/cdh/resource/default/app/other"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "not_found");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("default/app/other")
        );

        let resp = http.put(&url).body("x").send().await.unwrap();
        assert_eq!(resp.status(), 405);
        let resp = http
            .get(format!("http://{addr}/cdh/resource/default/app"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let resp = http
            .get(format!("http://{addr}/cdh/resource/default/app/bad%20tag"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_path");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = taken.local_addr().unwrap();
        let (addr, mut bound) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(listen, store, addr, stop.clone()));
        // On this single-threaded runtime one yield runs the task's first bind, which fails.
        tokio::task::yield_now().await;
        assert_eq!(*bound.borrow(), None);
        assert!(!task.is_finished(), "a taken port is not fatal");
        // Free the port: the retry (5 s later) binds it.
        drop(taken);
        let got = tokio::time::timeout(Duration::from_secs(15), bound.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, listen);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(*bound.borrow(), None);
    }

    #[tokio::test]
    async fn peers_outside_the_guest_are_refused() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        store
            .apply_resource(&"default/app/key".parse().unwrap(), 1, b"one")
            .unwrap();
        let ask = |peer: SocketAddr| {
            let mut request = axum::http::Request::builder()
                .uri("/cdh/resource/default/app/key")
                .body(axum::body::Body::empty())
                .unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
            router(Arc::clone(&store)).oneshot(request)
        };
        let remote = ask("10.1.2.3:5000".parse().unwrap()).await.unwrap();
        assert_eq!(remote.status(), StatusCode::FORBIDDEN);
        let mapped = ask("[::ffff:127.0.0.1]:5000".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(mapped.status(), StatusCode::OK);
        let v6 = ask("[::1]:5000".parse().unwrap()).await.unwrap();
        assert_eq!(v6.status(), StatusCode::OK);
    }
}
