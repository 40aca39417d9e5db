//! A tunnel without a socket: a [`TunnelHandle`] whose calls are answered by a
//! `GuestService` in the same process. The calls take the handle's real path (in-flight
//! limit, deadline, cancel, encoding of the request) and the guest's real dispatcher
//! semantics; only the WebSocket between them is missing. For unit tests of what calls
//! guests (the rotation engine, probes), which then need neither a socket nor a KBS.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::{AbortHandle, Abortable};
use futures::stream::FuturesUnordered;
use rpc_defs::GuestService;
use tarpc::server::Serve;

use crate::calls::Command;
use crate::frame::{self, FrameRef};
use crate::handle::{TunnelHandle, TunnelInfo};
use crate::observer::NoopObserver;
use crate::push_key::PushKey;
use crate::rpc::{self, Incoming};

/// How a [`connect`]ed handle behaves.
#[derive(Clone, Debug)]
pub struct InProcessConfig {
    /// Calls in flight at once (the handle's limit).
    pub max_in_flight: usize,
    /// Deadline of a call that names none.
    pub call_deadline: Duration,
    /// The tunnel's push key, as a `tether.v2` handshake would have agreed.
    pub push_key: Option<PushKey>,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            call_deadline: Duration::from_secs(10),
            push_key: None,
        }
    }
}

/// A handle for `info`, and the future that serves its calls with `service` until the handle
/// is closed or the future is dropped (the guest "disappears": calls then fail
/// `Disconnected`). `GuestService` futures need not be `Send` (the guest runs them on its
/// tunnel task), so run the future on a `LocalSet` (`tokio::task::spawn_local`).
pub fn connect<S>(
    info: TunnelInfo,
    config: InProcessConfig,
    service: S,
) -> (Arc<TunnelHandle>, impl Future<Output = ()> + 'static)
where
    S: GuestService + Clone + 'static,
{
    let handle = Arc::new(
        TunnelHandle::new(
            info,
            config.max_in_flight,
            config.call_deadline,
            Arc::new(NoopObserver),
        )
        .with_push_key(config.push_key),
    );
    (handle.clone(), serve(handle, service))
}

async fn serve<S>(handle: Arc<TunnelHandle>, service: S)
where
    S: GuestService + Clone + 'static,
{
    let _shut = ShutOnDrop(handle.clone());
    let mut running = FuturesUnordered::new();
    let mut aborts: HashMap<u64, AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            cmd = poll_fn(|cx| handle.call_queue().poll_pop(cx)) => match cmd {
                Command::Call { id, bytes, reply, .. } => {
                    let request = match frame::decode_ref(&bytes, usize::MAX) {
                        Ok(FrameRef::Rpc(payload)) => rpc::decode_incoming(&payload),
                        Ok(FrameRef::Other(_)) | Err(_) => continue,
                    };
                    let Ok(Incoming::Request { deadline, message, .. }) = request else {
                        continue;
                    };
                    let service = service.clone();
                    let (abort, registration) = AbortHandle::new_pair();
                    running.push(Abortable::new(
                        async move {
                            let ctx = tarpc::context::current();
                            let call = Serve::serve(service.serve(), ctx, message);
                            // Past the deadline the KBS stopped waiting: nothing is answered.
                            if let Ok(answer) = tokio::time::timeout(deadline, call).await {
                                let _ = reply.send(answer);
                            }
                            id
                        },
                        registration,
                    ));
                    aborts.insert(id, abort);
                }
                Command::Cancel { id } => {
                    if let Some(abort) = aborts.remove(&id) {
                        abort.abort();
                    }
                }
            },
            Some(done) = running.next(), if !running.is_empty() => {
                if let Ok(id) = done {
                    aborts.remove(&id);
                }
            }
            () = handle.shutdown_token().cancelled() => return,
        }
    }
}

/// Ends the handle when the serving task ends, however it ends (a guest that vanished).
struct ShutOnDrop(Arc<TunnelHandle>);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        self.0.shut();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rpc_defs::{
        Applied, CredentialBundle, GuestError, Installed, ProbeKind, ProbeReport, SealedResource,
    };
    use serde_bytes::ByteBuf;
    use tarpc::context::Context;

    use super::*;
    use crate::handle::CallError;

    #[derive(Clone)]
    struct Slow;

    impl GuestService for Slow {
        async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
            if payload.as_slice() == b"wait" {
                std::future::pending::<()>().await;
            }
            payload
        }
        async fn install_credentials(
            self,
            _: Context,
            _: CredentialBundle,
        ) -> Result<Installed, GuestError> {
            Err(GuestError::Unsupported("install".into()))
        }
        async fn apply_resource(
            self,
            _: Context,
            _: SealedResource,
        ) -> Result<Applied, GuestError> {
            Err(GuestError::Unsupported("apply".into()))
        }
        async fn probe(self, _: Context, _: ProbeKind) -> Result<ProbeReport, GuestError> {
            Err(GuestError::Unsupported("probe".into()))
        }
    }

    fn info() -> TunnelInfo {
        TunnelInfo {
            guest_id: "g1".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn calls_are_answered_in_process_and_end_with_the_guest() {
        let local = tokio::task::LocalSet::new();
        local.run_until(calls_end_with_the_guest()).await;
    }

    async fn calls_end_with_the_guest() {
        let (handle, guest) = connect(info(), InProcessConfig::default(), Slow);
        let task = tokio::task::spawn_local(guest);
        assert_eq!(handle.ping(b"hi".to_vec(), None).await.unwrap(), b"hi");
        let err = handle.probe(ProbeKind::All, None).await.unwrap_err();
        assert!(matches!(err, CallError::Guest(GuestError::Unsupported(_))));
        let err = handle
            .ping(b"wait".to_vec(), Some(Duration::from_millis(20)))
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::DeadlineExceeded));
        task.abort();
        let _ = task.await;
        let err = handle.ping(b"hi".to_vec(), None).await.unwrap_err();
        assert!(matches!(err, CallError::Disconnected), "{err:?}");
        assert!(handle.is_closed());
    }
}
