//! The byte streams under HTTP: a socket that carries its place in the server's budget, and
//! the first bytes of a connection, read under a deadline and handed back to hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::pool::SocketPermit;

/// The connection preface every HTTP/2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream holding its socket's place in the server's budget until it is dropped (an
/// upgrade moves it, place included, to the handler).
pub(crate) struct Counted<S> {
    inner: S,
    _permit: SocketPermit,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, permit: SocketPermit) -> Self {
        Self {
            inner,
            _permit: permit,
        }
    }
}

/// Bytes read ahead of hyper, served to it before the stream's own.
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

/// Why a connection sent no usable first bytes.
#[derive(Debug)]
pub(crate) enum FirstBytes {
    /// The deadline passed first.
    TimedOut,
    /// The peer closed the connection (or it failed) first.
    Closed,
}

/// Read until the first bytes tell HTTP/1 from HTTP/2 (a byte that departs from the HTTP/2
/// preface, or the whole preface), by `deadline`; the stream comes back with them to be
/// read again. Without this, hyper-util's detection waits for those bytes for ever.
pub(crate) async fn first_bytes<S: AsyncRead + Unpin>(
    mut stream: S,
    deadline: Instant,
) -> Result<Rewind<S>, FirstBytes> {
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    while prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&prefix) {
        let mut chunk = [0u8; 24];
        let room = H2_PREFACE.len() - prefix.len();
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room]));
        match read.await {
            Err(_) => return Err(FirstBytes::TimedOut),
            Ok(Ok(0) | Err(_)) => return Err(FirstBytes::Closed),
            Ok(Ok(n)) => prefix.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(Rewind {
        prefix,
        read: 0,
        inner: stream,
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn detect(sent: &[u8]) -> Result<Vec<u8>, FirstBytes> {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut rewound = first_bytes(server, deadline).await?;
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        Ok(all)
    }

    #[tokio::test]
    async fn the_first_bytes_are_read_once_and_handed_back() {
        // HTTP/1: the first byte already departs from the preface.
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\n").await.unwrap(),
            b"GET / HTTP/1.1\r\n"
        );
        // HTTP/2: the whole preface, and what follows it.
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"frames");
        assert_eq!(detect(&h2).await.unwrap(), h2);
        // "PRI" then a departure: HTTP/1 (hyper answers it).
        assert_eq!(detect(b"PRX").await.unwrap(), b"PRX");
    }

    #[tokio::test]
    async fn silence_or_a_stalled_preface_times_out() {
        for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(64);
            client.write_all(sent).await.unwrap();
            let deadline = Instant::now() + Duration::from_millis(50);
            let outcome = first_bytes(server, deadline).await;
            assert!(matches!(outcome, Err(FirstBytes::TimedOut)), "{sent:?}");
            drop(client);
        }
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let outcome = first_bytes(server, Instant::now() + Duration::from_secs(5)).await;
        assert!(matches!(outcome, Err(FirstBytes::Closed)));
    }
}
