//! A TCP relay between guests and a KBS that the test drives into a fault: every connection
//! cut at once (what a killed process or a reset link leaves: no close frame, no TLS
//! close), or every connection silent (what a frozen VM or a vanished network leaves: the
//! socket stays open, nothing arrives, nothing is acknowledged). New connections are relayed
//! normally after either fault, so a guest that reconnects gets through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One relayed connection.
struct Relay {
    task: JoinHandle<()>,
    silence: CancellationToken,
}

/// A fault-injecting TCP relay to `upstream`.
pub struct FaultProxy {
    /// Where guests connect.
    pub addr: SocketAddr,
    relays: Arc<Mutex<Vec<Relay>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Relays every connection made to [`FaultProxy::addr`] to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, upstream)
    }

    /// [`FaultProxy::start`] on `addr`: a proxy dropped earlier comes back where its
    /// clients knew it (what a restarted server looks like); waits while the old one lets go
    /// of the port.
    pub async fn start_at(addr: SocketAddr, upstream: SocketAddr) -> Self {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, "proxy port still taken");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        Self::serve(listener, upstream)
    }

    fn serve(listener: TcpListener, upstream: SocketAddr) -> Self {
        let addr = listener.local_addr().expect("addr");
        let relays: Arc<Mutex<Vec<Relay>>> = Arc::default();
        let accept = {
            let relays = relays.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let silence = CancellationToken::new();
                    let task = tokio::spawn(relay(inbound, upstream, silence.clone()));
                    let mut relays = relays.lock().expect("relays");
                    relays.retain(|r| !r.task.is_finished());
                    relays.push(Relay { task, silence });
                }
            })
        };
        Self {
            addr,
            relays,
            accept,
        }
    }

    /// `http://<addr>`: a base URL for clients (RCAR and the tunnel both go through).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every relayed connection at once: both peers see the socket close.
    pub fn cut(&self) {
        for relay in self.relays.lock().expect("relays").drain(..) {
            relay.task.abort();
        }
    }

    /// Stops forwarding on every relayed connection, in both directions, keeping both sockets
    /// open: bytes in flight are lost, later ones are never read. Returns how many
    /// connections fell silent.
    pub fn silence(&self) -> usize {
        let relays = self.relays.lock().expect("relays");
        let live: Vec<_> = relays.iter().filter(|r| !r.task.is_finished()).collect();
        for relay in &live {
            relay.silence.cancel();
        }
        live.len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(mut inbound: TcpStream, upstream: SocketAddr, silence: CancellationToken) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        () = silence.cancelled() => {
            // Hold both sockets open and read nothing until the test cuts or drops the proxy.
            let _held = (inbound, outbound);
            std::future::pending::<()>().await;
        }
    }
}
