//! [`Backend`]: one external plugin process as the KBS sees it: a lazily connected gRPC
//! channel that can be swapped for a new endpoint at run time, a bound on concurrent
//! requests and a deadline on every call. A plugin that is down, hangs or answers garbage
//! only ever yields a [`CallError`] for its own requests.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kbs_core::metrics::{Labels, latency_histogram};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::Target;
use crate::proto::kbs_plugin_v1::kbs_plugin_client::KbsPluginClient;
use crate::proto::kbs_plugin_v1::{
    NeedsEncryptionRequest, PluginRequest, PluginResponse, ValidateAuthRequest,
};

/// Why a call to the plugin gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Every slot was taken for the whole deadline.
    #[error("external plugin `{0}` is busy: {1} requests in flight")]
    Busy(&'static str, usize),
    /// Down, hung past the deadline, or answered something that is not the protocol.
    #[error("external plugin `{0}` is unavailable: {1}")]
    Unavailable(&'static str, String),
    /// The plugin said not found (gRPC `NOT_FOUND` or `status_code` 404).
    #[error("external plugin `{0}`: not found: {1}")]
    NotFound(&'static str, String),
    /// The plugin refused or failed the request itself (upstream answers 401 then).
    #[error("external plugin `{0}` refused the request: {1}")]
    Refused(&'static str, String),
}

/// The request as forwarded: upstream's four fields.
#[derive(Clone, Debug)]
pub struct Forwarded {
    /// Raw HTTP body.
    pub body: Bytes,
    /// Query parameters.
    pub query: HashMap<String, String>,
    /// Path segments after `/kbs/v0/external/<name>/`.
    pub path: Vec<String>,
    /// HTTP method.
    pub method: String,
}

impl Forwarded {
    /// The request as one of upstream's three messages (`ValidateAuth`, `Handle` and
    /// `NeedsEncryption` each carry the same four fields).
    fn message<M: ForwardedMessage>(&self) -> M {
        M::from_parts(
            self.body.to_vec(),
            self.query.clone(),
            self.path.clone(),
            self.method.clone(),
        )
    }
}

/// One of upstream's request messages, built from the forwarded request's parts.
trait ForwardedMessage {
    fn from_parts(
        body: Vec<u8>,
        query: HashMap<String, String>,
        path: Vec<String>,
        method: String,
    ) -> Self;
}

macro_rules! forwarded_message {
    ($($ty:ty),*) => {$(
        impl ForwardedMessage for $ty {
            fn from_parts(
                body: Vec<u8>,
                query: HashMap<String, String>,
                path: Vec<String>,
                method: String,
            ) -> Self {
                Self { body, query, path, method }
            }
        }
    )*};
}

forwarded_message!(ValidateAuthRequest, PluginRequest, NeedsEncryptionRequest);

/// What a plugin answered to `Handle`, accepted (`status_code` 0 or 2xx).
#[derive(Debug)]
pub struct Answer {
    /// Response body.
    pub body: Vec<u8>,
    /// The plugin's `content_type`, when it set one.
    pub content_type: String,
}

/// A channel to one endpoint.
pub struct Connection {
    /// Where it goes.
    pub target: Target,
    client: KbsPluginClient<Channel>,
}

impl Connection {
    /// A lazily connected channel (no I/O now: a plugin that is down at start costs only
    /// its own requests, and a restarted one is reached again by the next call).
    pub fn open(target: Target) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(target.endpoint.clone())
            .map_err(|e| format!("invalid endpoint: {e}"))?
            .connect_timeout(target.timeout.min(Duration::from_secs(2)))
            .timeout(target.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(pem) = &target.ca_pem {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("invalid TLS settings: {e}"))?;
        }
        Ok(Self {
            client: KbsPluginClient::new(endpoint.connect_lazy()),
            target,
        })
    }
}

/// Call counters and latency, in the plugin's own metrics scope.
#[derive(Clone)]
struct CallMetrics {
    calls: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
}

/// One external plugin.
pub struct Backend {
    name: &'static str,
    current: RwLock<Arc<Connection>>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    metrics: CallMetrics,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("endpoint", &self.connection().target.endpoint)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Backend `name` (the segment after `external/`) reaching `target`, at most
    /// `max_concurrent` requests at once; registers `calls` and `call_duration_seconds`.
    pub fn new(
        name: &'static str,
        target: Target,
        max_concurrent: usize,
        metrics: &mut Registry,
    ) -> Result<Self, String> {
        let m = CallMetrics {
            calls: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        metrics.register(
            "calls",
            "Calls to the external plugin by RPC and outcome",
            m.calls.clone(),
        );
        metrics.register(
            "call_duration_seconds",
            "Latency of calls to the external plugin by RPC",
            m.duration.clone(),
        );
        Ok(Self {
            name,
            current: RwLock::new(Arc::new(Connection::open(target)?)),
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            metrics: m,
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The concurrency bound.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// The connection in force (calls in flight keep the one they started with).
    pub fn connection(&self) -> Arc<Connection> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Point at `target` from the next request on.
    pub fn swap(&self, target: Target) -> Result<(), String> {
        let next = Arc::new(Connection::open(target)?);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
        Ok(())
    }

    /// A slot for one request, waiting at most the call deadline.
    pub async fn permit(&self) -> Result<OwnedSemaphorePermit, CallError> {
        let wait = self.connection().target.timeout;
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                self.count("any", "busy", None);
                Err(CallError::Busy(self.name, self.max_concurrent))
            }
        }
    }

    fn count(&self, rpc: &'static str, outcome: &'static str, started: Option<Instant>) {
        self.metrics
            .calls
            .get_or_create(&vec![
                ("rpc", rpc.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if let Some(t) = started {
            self.metrics
                .duration
                .get_or_create(&vec![("rpc", rpc.to_string())])
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// `ValidateAuth`: whether the request needs an admin.
    pub async fn validate_auth(&self, conn: &Connection, f: &Forwarded) -> Result<bool, CallError> {
        let req: ValidateAuthRequest = f.message();
        let mut client = conn.client.clone();
        let reply = self
            .call(
                "validate_auth",
                conn.target.timeout,
                client.validate_auth(deadline(req, conn)),
            )
            .await?;
        Ok(reply.requires_admin_auth)
    }

    /// `Handle`: the plugin's answer, with its `status_code` applied as upstream does.
    pub async fn handle(&self, conn: &Connection, f: &Forwarded) -> Result<Answer, CallError> {
        let req: PluginRequest = f.message();
        let mut client = conn.client.clone();
        let reply: PluginResponse = self
            .call(
                "handle",
                conn.target.timeout,
                client.handle(deadline(req, conn)),
            )
            .await?;
        match reply.status_code {
            0 | 200..=299 => Ok(Answer {
                body: reply.body,
                content_type: reply.content_type,
            }),
            404 => Err(CallError::NotFound(self.name, "status_code 404".into())),
            code => Err(CallError::Refused(self.name, format!("status_code {code}"))),
        }
    }

    /// `NeedsEncryption`: whether to seal the answer to the caller's TEE key.
    pub async fn needs_encryption(
        &self,
        conn: &Connection,
        f: &Forwarded,
    ) -> Result<bool, CallError> {
        let req: NeedsEncryptionRequest = f.message();
        let mut client = conn.client.clone();
        let reply = self
            .call(
                "needs_encryption",
                conn.target.timeout,
                client.needs_encryption(deadline(req, conn)),
            )
            .await?;
        Ok(reply.requires_payload_encryption)
    }

    async fn call<T>(
        &self,
        rpc: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CallError> {
        let started = Instant::now();
        // The channel has the same deadline; this one also covers a stalled connect.
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
        };
        match result {
            Ok(reply) => {
                self.count(rpc, "ok", Some(started));
                Ok(reply.into_inner())
            }
            Err(status) => {
                let err = classify(self.name, timeout, &status);
                let outcome = match err {
                    CallError::Unavailable(..) => "unavailable",
                    CallError::NotFound(..) => "not_found",
                    CallError::Refused(..) | CallError::Busy(..) => "refused",
                };
                self.count(rpc, outcome, Some(started));
                tracing::warn!(plugin = self.name, rpc, code = ?status.code(), message = status.message(), "external plugin call failed");
                Err(err)
            }
        }
    }
}

/// A request carrying its deadline (`grpc-timeout`), so the plugin knows it too.
fn deadline<T>(msg: T, conn: &Connection) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(conn.target.timeout);
    req
}

/// gRPC status -> what the caller gets: `NOT_FOUND` is 404 (upstream); codes a plugin
/// chooses to refuse with are upstream's plugin error (401); transport failures, the
/// deadline and answers that are not the protocol make the plugin unavailable (503).
fn classify(name: &'static str, timeout: Duration, status: &tonic::Status) -> CallError {
    use tonic::Code;
    match status.code() {
        Code::NotFound => CallError::NotFound(name, status.message().to_string()),
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange => CallError::Refused(name, format!("{:?}", status.code())),
        Code::DeadlineExceeded | Code::Cancelled => {
            CallError::Unavailable(name, format!("no answer within {} ms", timeout.as_millis()))
        }
        Code::Unavailable => CallError::Unavailable(name, "cannot be reached".into()),
        _ => CallError::Unavailable(name, format!("broken answer ({:?})", status.code())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::check_target;

    #[tokio::test]
    async fn a_full_plugin_is_busy_after_the_deadline_and_a_swap_changes_the_target() {
        let target = check_target("http://127.0.0.1:9", None, None, Some(50)).unwrap();
        let backend = Backend::new("p", target, 1, &mut Registry::default()).unwrap();
        let held = backend.permit().await.unwrap();
        let started = Instant::now();
        let err = backend.permit().await.unwrap_err();
        assert!(matches!(err, CallError::Busy("p", 1)), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(held);
        let _again = backend.permit().await.unwrap();

        let next = check_target("http://127.0.0.1:10", None, None, Some(70)).unwrap();
        backend.swap(next.clone()).unwrap();
        assert_eq!(backend.connection().target, next);
    }

    #[test]
    fn statuses_map_to_what_the_caller_gets() {
        let t = Duration::from_millis(5);
        let c = |s: tonic::Status| classify("p", t, &s);
        assert!(matches!(
            c(tonic::Status::not_found("x")),
            CallError::NotFound(..)
        ));
        assert!(matches!(
            c(tonic::Status::permission_denied("x")),
            CallError::Refused(..)
        ));
        assert!(matches!(
            c(tonic::Status::unavailable("x")),
            CallError::Unavailable(..)
        ));
        assert!(matches!(
            c(tonic::Status::internal("x")),
            CallError::Unavailable(..)
        ));
        let CallError::Unavailable(_, why) = c(tonic::Status::deadline_exceeded("x")) else {
            panic!()
        };
        assert_eq!(why, "no answer within 5 ms");
    }
}
