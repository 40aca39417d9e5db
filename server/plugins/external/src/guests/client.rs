//! The client side of the Guests API, for plugins written in Rust (the `credpush` example,
//! the tests): a channel to `unix:/path` or `http://127.0.0.1:port` that adds the plugin's
//! bearer token to every call. Connects lazily, reconnects on its own.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::proto::tether_plugin_v1::guests_client::GuestsClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer([redacted])")
    }
}

impl Bearer {
    /// The header for `token` (surrounding whitespace trimmed).
    pub fn new(token: &str) -> Result<Self, String> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(Self)
            .map_err(|_| "the token is not printable ASCII".to_string())
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A Guests API client.
pub type Client = GuestsClient<InterceptedService<Channel, Bearer>>;

/// A channel to `address` (`unix:/path` or `http://host:port`).
pub fn channel(address: &str) -> Result<Channel, String> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI only names the channel: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://guests-api.invalid")
            .connect_timeout(Duration::from_secs(5));
        return Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        );
    }
    if !address.starts_with("http://") {
        return Err(format!(
            "`{address}`: expected unix:/path or http://host:port"
        ));
    }
    Ok(Endpoint::from_shared(address.to_string())
        .map_err(|e| format!("`{address}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A client of the Guests API at `address` presenting `token`.
pub fn connect(address: &str, token: &str) -> Result<Client, String> {
    Ok(GuestsClient::with_interceptor(
        channel(address)?,
        Bearer::new(token)?,
    ))
}
