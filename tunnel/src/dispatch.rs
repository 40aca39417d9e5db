//! The guest's RPC dispatcher: runs each `GuestService` request the KBS sends as a future on
//! the tunnel task and queues its encoded answer for the socket.
//!
//! It keeps tarpc's wire format and the semantics of `tarpc::server::BaseChannel` with
//! `max_concurrent_requests`, without its channel, queues and per-request context lookups
//! (on a 256-byte `ping` those hops cost more than the call):
//! - more than `limit` requests running: answered at once with `WouldBlock`, "server
//!   throttled the request." (tarpc's wording), and the tunnel stays up;
//! - a request id that is already running: ignored, as tarpc does;
//! - `Cancel`: the request's future is dropped and nothing is answered;
//! - past its deadline: the future is dropped and nothing is answered (the KBS stopped
//!   waiting at the same moment).
//!
//! Sans-IO apart from the futures it runs: the tunnel task feeds it decoded messages
//! ([`Dispatcher::receive`]), polls it ([`Dispatcher::poll_calls`]) and writes what it
//! queued (it is the link's [`RpcSide`]).

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{
    StreamExt,
    future::{AbortHandle, Abortable},
    stream::FuturesUnordered,
};
use rpc_defs::{GuestServiceRequest, GuestServiceResponse};
use tarpc::{Response, ServerError};
use tokio::time::{Instant, Timeout, timeout_at};
use tracing::{Instrument, instrument::Instrumented};

use crate::{
    link::RpcSide,
    rpc::{GuestEncoder, Incoming},
};

/// tarpc's answer to a request over the channel's limit.
pub(crate) const THROTTLED: &str = "server throttled the request.";

pin_project_lite::pin_project! {
    /// One running request: its id, and its future under its deadline and abort handle.
    struct Running<F> {
        id: u64,
        #[pin]
        call: Abortable<Timeout<Instrumented<F>>>,
    }
}

impl<F: Future> Future for Running<F> {
    /// The id, and the answer unless the call was cancelled or ran past its deadline.
    type Output = (u64, Option<F::Output>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.call.poll(cx).map(|outcome| match outcome {
            Ok(Ok(answer)) => (*this.id, Some(answer)),
            // Past its deadline, or cancelled.
            Ok(Err(_)) | Err(_) => (*this.id, None),
        })
    }
}

/// Runs requests with `serve` (each in a debug span `rpc`) and queues their encoded answers.
pub(crate) struct Dispatcher<M, F> {
    serve: M,
    /// Copied into each request's context (building one from the current span is costly).
    context: tarpc::context::Context,
    running: FuturesUnordered<Running<F>>,
    aborts: HashMap<u64, AbortHandle>,
    limit: usize,
    encoder: GuestEncoder,
    out: VecDeque<Bytes>,
    out_limit: usize,
}

impl<M, F> Dispatcher<M, F>
where
    M: FnMut(tarpc::context::Context, GuestServiceRequest) -> F,
    F: Future<Output = Result<GuestServiceResponse, ServerError>>,
{
    /// Runs at most `limit` requests at once; stops reading while `out_limit` answers wait
    /// for the socket.
    pub fn new(serve: M, limit: usize, out_limit: usize, encoder: GuestEncoder) -> Self {
        Self {
            serve,
            context: tarpc::context::current(),
            running: FuturesUnordered::new(),
            aborts: HashMap::new(),
            limit: limit.max(1),
            encoder,
            out: VecDeque::new(),
            out_limit: out_limit.max(1),
        }
    }

    /// Starts, throttles or cancels a request. The new future first runs at the next
    /// [`Dispatcher::poll_calls`].
    pub fn receive(&mut self, message: Incoming) {
        match message {
            Incoming::Request {
                id,
                deadline,
                trace_context,
                message,
            } => {
                if self.aborts.contains_key(&id) {
                    tracing::debug!(request_id = id, "duplicate request id ignored");
                    return;
                }
                if self.running.len() >= self.limit {
                    tracing::debug!(request_id = id, limit = self.limit, "request throttled");
                    let throttled =
                        ServerError::new(std::io::ErrorKind::WouldBlock, THROTTLED.into());
                    self.answer(id, Err(throttled));
                    return;
                }
                let deadline = Instant::now() + deadline;
                let mut context = self.context;
                context.deadline = deadline.into_std();
                context.trace_context = trace_context;
                let (abort, registration) = AbortHandle::new_pair();
                let span = tracing::debug_span!(
                    "rpc",
                    request_id = id,
                    rpc = tarpc::RequestName::name(&message)
                );
                let call = timeout_at(deadline, (self.serve)(context, message).instrument(span));
                self.aborts.insert(id, abort);
                self.running.push(Running {
                    id,
                    call: Abortable::new(call, registration),
                });
            }
            Incoming::Cancel { id } => match self.aborts.get(&id) {
                // Its entry goes when the aborted future is collected in `poll_calls` (the
                // same loop turn), not here: removing it now would let that collection remove
                // a later request's entry under the same id. Until then the id counts as
                // running, which only matters to a peer reusing ids (the KBS never does).
                Some(abort) => abort.abort(),
                None => tracing::trace!(request_id = id, "cancel for a request no longer running"),
            },
        }
    }

    /// Runs the requests; queues the answers of those that finished.
    pub fn poll_calls(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some((id, outcome))) = self.running.poll_next_unpin(cx) {
            self.aborts.remove(&id);
            match outcome {
                Some(result) => self.answer(id, result),
                None => tracing::debug!(request_id = id, "request cancelled or past its deadline"),
            }
        }
    }

    /// Requests running now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }

    fn answer(&mut self, id: u64, message: Result<GuestServiceResponse, ServerError>) {
        let response = Response {
            request_id: id,
            message,
        };
        match self.encoder.encode(response) {
            Ok(bytes) => self.out.push_back(bytes),
            // Only a serializer bug gets here; the KBS's deadline ends the call.
            Err(e) => tracing::error!(request_id = id, error = %e, "cannot encode an answer"),
        }
    }
}

impl<M, F> RpcSide for Dispatcher<M, F> {
    fn poll_out(&mut self, _: &mut Context<'_>) -> Poll<Option<Bytes>> {
        // Answers are queued only on this task, which polls the link right after.
        match self.out.pop_front() {
            Some(bytes) => Poll::Ready(Some(bytes)),
            None => {
                if self.out.capacity() > 64 {
                    self.out = VecDeque::new();
                }
                Poll::Pending
            }
        }
    }

    fn poll_in_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        // Full only while the socket cannot take writes, whose readiness wakes this task.
        if self.out.len() < self.out_limit {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use futures::task::noop_waker_ref;
    use rpc_defs::Frame;
    use serde_bytes::ByteBuf;
    use tokio::sync::Notify;

    use super::*;
    use crate::frame;

    fn ping(id: u64, deadline: Duration) -> Incoming {
        Incoming::Request {
            id,
            deadline,
            trace_context: tarpc::trace::Context::default(),
            message: GuestServiceRequest::Ping {
                payload: ByteBuf::from(vec![id as u8]),
            },
        }
    }

    fn answers<M, F>(d: &mut Dispatcher<M, F>) -> Vec<Response<GuestServiceResponse>> {
        d.out
            .drain(..)
            .map(|bytes| match frame::decode(&bytes, usize::MAX) {
                Ok(Frame::Rpc(payload)) => frame::decode_payload(&payload).expect("response"),
                other => panic!("not an rpc frame: {other:?}"),
            })
            .collect()
    }

    type Answer = futures::future::BoxFuture<'static, Result<GuestServiceResponse, ServerError>>;

    /// A dispatcher whose pings wait for `gate` before echoing.
    fn gated(
        gate: Arc<Notify>,
        limit: usize,
    ) -> Dispatcher<impl FnMut(tarpc::context::Context, GuestServiceRequest) -> Answer, Answer>
    {
        let serve = move |_ctx, req| -> Answer {
            let gate = gate.clone();
            Box::pin(async move {
                gate.notified().await;
                match req {
                    GuestServiceRequest::Ping { payload } => {
                        Ok(GuestServiceResponse::Ping(payload))
                    }
                    _ => Err(ServerError::new(
                        std::io::ErrorKind::Unsupported,
                        "test".into(),
                    )),
                }
            })
        };
        Dispatcher::new(serve, limit, 8, GuestEncoder { max_frame: 1 << 20 })
    }

    fn poll<M, F>(d: &mut Dispatcher<M, F>)
    where
        M: FnMut(tarpc::context::Context, GuestServiceRequest) -> F,
        F: Future<Output = Result<GuestServiceResponse, ServerError>>,
    {
        d.poll_calls(&mut Context::from_waker(noop_waker_ref()));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_carry_the_request_id_and_throttling_matches_tarpc() {
        let gate = Arc::new(Notify::new());
        let mut d = gated(gate.clone(), 2);
        d.receive(ping(1, Duration::from_secs(5)));
        d.receive(ping(2, Duration::from_secs(5)));
        d.receive(ping(3, Duration::from_secs(5)));
        poll(&mut d);
        let throttled = answers(&mut d);
        assert_eq!(throttled.len(), 1);
        assert_eq!(throttled[0].request_id, 3);
        assert!(matches!(&throttled[0].message,
            Err(e) if e.kind == std::io::ErrorKind::WouldBlock && e.detail == THROTTLED));

        gate.notify_waiters();
        poll(&mut d);
        let mut ids: Vec<_> = answers(&mut d).iter().map(|r| r.request_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        assert_eq!(d.running(), 0);
        assert!(d.aborts.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_are_ignored_and_cancelled_calls_answer_nothing() {
        let gate = Arc::new(Notify::new());
        let mut d = gated(gate.clone(), 8);
        d.receive(ping(7, Duration::from_secs(5)));
        d.receive(ping(7, Duration::from_secs(5)));
        assert_eq!(d.running(), 1);
        d.receive(Incoming::Cancel { id: 7 });
        d.receive(Incoming::Cancel { id: 99 });
        poll(&mut d);
        assert_eq!(d.running(), 0);
        assert!(d.aborts.is_empty());
        gate.notify_waiters();
        poll(&mut d);
        assert!(answers(&mut d).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_dropped_without_an_answer() {
        let gate = Arc::new(Notify::new());
        let mut d = gated(gate, 8);
        d.receive(ping(1, Duration::from_millis(100)));
        poll(&mut d);
        assert_eq!(d.running(), 1);
        tokio::time::advance(Duration::from_millis(101)).await;
        poll(&mut d);
        assert_eq!(d.running(), 0);
        assert!(answers(&mut d).is_empty());
        assert!(d.aborts.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn reading_pauses_while_answers_wait_for_the_socket() {
        let gate = Arc::new(Notify::new());
        let mut d = gated(gate.clone(), 64);
        let mut cx = Context::from_waker(noop_waker_ref());
        for id in 0..8 {
            d.receive(ping(id, Duration::from_secs(5)));
        }
        poll(&mut d);
        assert!(d.poll_in_ready(&mut cx).is_ready());
        gate.notify_waiters();
        poll(&mut d);
        assert_eq!(d.out.len(), 8);
        assert!(d.poll_in_ready(&mut cx).is_pending());
        assert!(matches!(d.poll_out(&mut cx), Poll::Ready(Some(_))));
        assert!(d.poll_in_ready(&mut cx).is_ready());
    }
}
