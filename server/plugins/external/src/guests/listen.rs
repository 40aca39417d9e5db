//! Where the Guests API listens (`listen = "127.0.0.1:50100"` or `"unix:/path"`; loopback
//! or a Unix socket only: the API is plaintext gRPC with bearer tokens), and the accepted
//! connections, at most `max_connections` at once (a connection holds its slot until it
//! closes; the next accept waits for one).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// A listen address, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path (created with mode 0600; a stale socket there is replaced).
    Unix(PathBuf),
}

impl Listen {
    /// Parse and check `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("`{text}`: the socket path must be absolute"));
            }
            return Ok(Self::Unix(path));
        }
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| format!("`{text}` is neither host:port nor unix:/path"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "`{text}` is not a loopback address: the Guests API is plaintext gRPC, \
                 serve it on 127.0.0.1, [::1] or a Unix socket"
            ));
        }
        Ok(Self::Tcp(addr))
    }

    /// Bind now (so a taken address fails the start, naming the key).
    pub fn bind(&self) -> io::Result<Bound> {
        match self {
            Self::Tcp(addr) => {
                let std = std::net::TcpListener::bind(addr)?;
                std.set_nonblocking(true)?;
                Ok(Bound::Tcp(TcpListener::from_std(std)?))
            }
            Self::Unix(path) => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let std = std::os::unix::net::UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                std.set_nonblocking(true)?;
                Ok(Bound::Unix(UnixListener::from_std(std)?))
            }
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Bound {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener),
}

impl Bound {
    /// The local address, as shown by `GET /kbs/v0/plugin`.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("? ({e})")),
            Self::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    async fn accept(&self) -> io::Result<Io> {
        match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Io::Tcp(s))
            }
            Self::Unix(l) => Ok(Io::Unix(l.accept().await?.0)),
        }
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted connection holding one of the `max_connections` slots.
pub struct Conn {
    io: Io,
    _slot: OwnedSemaphorePermit,
}

/// Accepted connections of `bound`, at most `max` open at once. An accept error (out of
/// descriptors) is yielded after a short pause so the server does not spin on it.
pub fn incoming(
    bound: Arc<Bound>,
    max: usize,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max));
    futures::stream::unfold((bound, slots), |(bound, slots)| async move {
        let slot = slots.clone().acquire_owned().await.ok()?;
        let item = match bound.accept().await {
            Ok(io) => Ok(Conn { io, _slot: slot }),
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(e)
            }
        };
        Some((item, (bound, slots)))
    })
}

impl Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_unix_sockets_are_accepted() {
        assert_eq!(
            Listen::parse("127.0.0.1:50100"),
            Ok(Listen::Tcp(
                "127.0.0.1:50100".parse().unwrap_or_else(|_| unreachable!())
            ))
        );
        assert!(Listen::parse("[::1]:1").is_ok());
        assert!(matches!(
            Listen::parse("unix:/run/t.sock"),
            Ok(Listen::Unix(_))
        ));
        for bad in ["0.0.0.0:50100", "10.0.0.1:1", "unix:rel.sock", "localhost"] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }
}
