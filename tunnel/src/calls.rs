//! The KBS side of the calls on one tunnel, without tarpc's client machinery: callers encode
//! their request and push it on the tunnel's [`CallQueue`]; the tunnel's single task writes
//! it, records it in its [`CallTable`], and hands the guest's answer back through a oneshot.
//!
//! Nothing here allocates while a tunnel is idle: the queue and the table are empty
//! collections, shrunk back after a busy spell; a call costs one oneshot and one table slot.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use rpc_defs::GuestServiceResponse;
use tarpc::{Response, ServerError};
use tokio::{sync::oneshot, time::Instant};

use crate::rpc::Method;

/// What a call gets back: the guest's answer, or the error tarpc's server sent instead.
pub(crate) type CallResult = Result<GuestServiceResponse, ServerError>;

/// Where the tunnel task puts a call's answer.
pub(crate) type Reply = oneshot::Sender<CallResult>;

/// How long a cancelled call's id stays known, so an answer already on the wire when the
/// caller gave up is dropped quietly instead of closing the tunnel as a protocol error.
pub(crate) const LATE_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Work for the tunnel task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Write this encoded request and route its answer to `reply`.
    Call {
        id: u64,
        method: Method,
        bytes: Bytes,
        reply: Reply,
    },
    /// The caller gave up on `id` (deadline or dropped): tell the guest to abort it.
    Cancel { id: u64 },
}

/// The queue callers push to and the tunnel task pops from. Bounded by the handle: every
/// `Call` holds an in-flight permit, and each call pushes at most one `Cancel`.
#[derive(Debug, Default)]
pub(crate) struct CallQueue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct QueueState {
    commands: VecDeque<Command>,
    closed: bool,
}

impl CallQueue {
    /// A fresh request id (unique on this tunnel).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues `cmd` and wakes the task; gives it back when the tunnel has ended.
    pub fn push(&self, cmd: Command) -> Result<(), Command> {
        {
            let Ok(mut state) = self.state.lock() else {
                return Err(cmd);
            };
            if state.closed {
                return Err(cmd);
            }
            state.commands.push_back(cmd);
        }
        self.waker.wake();
        Ok(())
    }

    fn pop(&self) -> Option<Command> {
        self.state.lock().ok()?.commands.pop_front()
    }

    /// The next command, or `Pending` (the task is woken by the next push).
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Command> {
        if let Some(cmd) = self.pop() {
            return Poll::Ready(cmd);
        }
        self.waker.register(cx.waker());
        // A push between the first look and the registration would be missed otherwise.
        match self.pop() {
            Some(cmd) => Poll::Ready(cmd),
            None => Poll::Pending,
        }
    }

    /// Refuses further pushes and drops what is queued (their callers see `Disconnected`).
    pub fn close(&self) {
        let drained = match self.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                std::mem::take(&mut state.commands)
            }
            Err(_) => VecDeque::new(),
        };
        drop(drained);
    }

    /// Gives back the queue's buffer when it is empty (an idle tunnel keeps none).
    pub fn shrink(&self) {
        if let Ok(mut state) = self.state.lock()
            && state.commands.is_empty()
            && state.commands.capacity() > 0
        {
            state.commands = VecDeque::new();
        }
    }

    /// Commands waiting (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.commands.len()).unwrap_or(0)
    }
}

/// The calls written to the guest and not answered yet (owned by the tunnel task).
#[derive(Debug, Default)]
pub(crate) struct CallTable {
    open: HashMap<u64, Open>,
}

#[derive(Debug)]
struct Open {
    method: Method,
    /// `None` once the caller gave up; the entry then only waits for a late answer.
    reply: Option<Reply>,
    /// When a cancelled entry is forgotten.
    forget_at: Option<Instant>,
}

/// What to do with a command popped from the queue.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Write these bytes.
    Write(Bytes),
    /// Nothing to write (the caller already left, or the call is already answered).
    Skip,
}

impl CallTable {
    /// Takes a command from the queue: records a call, or turns a cancel into a frame.
    pub fn on_command(
        &mut self,
        cmd: Command,
        now: Instant,
        encode_cancel: impl FnOnce(u64) -> Option<Bytes>,
    ) -> Outgoing {
        match cmd {
            Command::Call {
                id,
                method,
                bytes,
                reply,
            } => {
                if reply.is_closed() {
                    // The caller left before the request was written: never send it.
                    return Outgoing::Skip;
                }
                self.open.insert(
                    id,
                    Open {
                        method,
                        reply: Some(reply),
                        forget_at: None,
                    },
                );
                Outgoing::Write(bytes)
            }
            Command::Cancel { id } => match self.open.get_mut(&id) {
                Some(open) if open.reply.is_some() => {
                    open.reply = None;
                    open.forget_at = Some(now + LATE_ANSWER_GRACE);
                    encode_cancel(id).map_or(Outgoing::Skip, Outgoing::Write)
                }
                _ => Outgoing::Skip,
            },
        }
    }

    /// Routes an answer to its caller. An answer nobody asked for (never sent, already
    /// answered, forgotten) or of another method is a protocol error: the tunnel closes.
    pub fn on_response(&mut self, resp: Response<GuestServiceResponse>) -> Result<(), String> {
        let Some(open) = self.open.remove(&resp.request_id) else {
            return Err(format!("answer to unknown request {}", resp.request_id));
        };
        if let Ok(message) = &resp.message {
            let got = Method::of_response(message);
            if got != open.method {
                return Err(format!(
                    "request {} was {} but the answer is {}",
                    resp.request_id,
                    open.method.as_str(),
                    got.as_str()
                ));
            }
        }
        if let Some(reply) = open.reply {
            // The caller may have left in between; nothing to do then.
            let _ = reply.send(resp.message);
        }
        Ok(())
    }

    /// Forgets cancelled calls whose grace period is over, and frees an empty table's buffer.
    pub fn prune(&mut self, now: Instant) {
        self.open
            .retain(|_, open| open.forget_at.is_none_or(|at| at > now));
        if self.open.is_empty() && self.open.capacity() > 0 {
            self.open = HashMap::new();
        }
    }

    /// Calls written and not answered or forgotten.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn call(queue: &CallQueue, method: Method) -> (u64, oneshot::Receiver<CallResult>) {
        let (tx, rx) = oneshot::channel();
        let id = queue.next_id();
        queue
            .push(Command::Call {
                id,
                method,
                bytes: Bytes::from_static(b"req"),
                reply: tx,
            })
            .expect("open");
        (id, rx)
    }

    fn pop(queue: &CallQueue) -> Command {
        let waker = futures::task::noop_waker();
        match queue.poll_pop(&mut Context::from_waker(&waker)) {
            Poll::Ready(cmd) => cmd,
            Poll::Pending => panic!("queue empty"),
        }
    }

    fn pong(id: u64) -> Response<GuestServiceResponse> {
        Response {
            request_id: id,
            message: Ok(GuestServiceResponse::Ping(ByteBuf::new())),
        }
    }

    fn no_cancel(_: u64) -> Option<Bytes> {
        Some(Bytes::from_static(b"cancel"))
    }

    #[tokio::test]
    async fn answers_reach_their_caller_and_only_once() {
        let queue = CallQueue::default();
        let mut table = CallTable::default();
        let (a, rx_a) = call(&queue, Method::Ping);
        let (b, _rx_b) = call(&queue, Method::Probe);
        for _ in 0..2 {
            assert!(matches!(
                table.on_command(pop(&queue), Instant::now(), no_cancel),
                Outgoing::Write(_)
            ));
        }
        assert_eq!(table.len(), 2);
        table.on_response(pong(a)).expect("answer");
        assert!(matches!(rx_a.await, Ok(Ok(GuestServiceResponse::Ping(_)))));
        assert!(table.on_response(pong(a)).is_err(), "answered twice");
        assert!(table.on_response(pong(99)).is_err(), "never asked");
        assert!(table.on_response(pong(b)).is_err(), "wrong method");
    }

    #[test]
    fn errors_fit_any_method() {
        let queue = CallQueue::default();
        let mut table = CallTable::default();
        let (id, _rx) = call(&queue, Method::Probe);
        let _ = table.on_command(pop(&queue), Instant::now(), no_cancel);
        let throttled = Response {
            request_id: id,
            message: Err(ServerError::new(
                std::io::ErrorKind::WouldBlock,
                "busy".into(),
            )),
        };
        assert!(table.on_response(throttled).is_ok());
        assert_eq!(table.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_tolerates_a_late_answer_within_the_grace() {
        let queue = CallQueue::default();
        let mut table = CallTable::default();
        let (id, rx) = call(&queue, Method::Ping);
        let _ = table.on_command(pop(&queue), Instant::now(), no_cancel);
        drop(rx);
        queue.push(Command::Cancel { id }).expect("open");
        assert!(matches!(
            table.on_command(pop(&queue), Instant::now(), no_cancel),
            Outgoing::Write(b) if b == "cancel"
        ));
        // A second cancel of the same call writes nothing.
        queue.push(Command::Cancel { id }).expect("open");
        assert!(matches!(
            table.on_command(pop(&queue), Instant::now(), no_cancel),
            Outgoing::Skip
        ));
        tokio::time::sleep(LATE_ANSWER_GRACE / 2).await;
        table.prune(Instant::now());
        assert_eq!(table.len(), 1, "still within the grace period");
        table.on_response(pong(id)).expect("late answer is fine");

        // Past the grace, the id is forgotten and an answer is a protocol error.
        let (id, rx) = call(&queue, Method::Ping);
        let _ = table.on_command(pop(&queue), Instant::now(), no_cancel);
        drop(rx);
        queue.push(Command::Cancel { id }).expect("open");
        let _ = table.on_command(pop(&queue), Instant::now(), no_cancel);
        tokio::time::sleep(LATE_ANSWER_GRACE + Duration::from_secs(1)).await;
        table.prune(Instant::now());
        assert_eq!(table.len(), 0);
        assert!(table.on_response(pong(id)).is_err());
    }

    #[test]
    fn a_call_whose_caller_left_is_never_written() {
        let queue = CallQueue::default();
        let mut table = CallTable::default();
        let (id, rx) = call(&queue, Method::Ping);
        drop(rx);
        queue.push(Command::Cancel { id }).expect("open");
        assert!(matches!(
            table.on_command(pop(&queue), Instant::now(), no_cancel),
            Outgoing::Skip
        ));
        assert!(matches!(
            table.on_command(pop(&queue), Instant::now(), no_cancel),
            Outgoing::Skip
        ));
        assert_eq!(table.len(), 0);
    }

    #[tokio::test]
    async fn closing_fails_queued_calls_and_refuses_new_ones() {
        let queue = CallQueue::default();
        let (_, rx) = call(&queue, Method::Ping);
        queue.close();
        assert_eq!(queue.len(), 0);
        assert!(rx.await.is_err(), "queued call dropped");
        let (tx, _rx) = oneshot::channel();
        assert!(
            queue
                .push(Command::Call {
                    id: 1,
                    method: Method::Ping,
                    bytes: Bytes::new(),
                    reply: tx
                })
                .is_err()
        );
    }

    #[test]
    fn idle_collections_hold_no_buffer() {
        let queue = CallQueue::default();
        let mut table = CallTable::default();
        let (id, _rx) = call(&queue, Method::Ping);
        let _ = table.on_command(pop(&queue), Instant::now(), no_cancel);
        table.on_response(pong(id)).expect("answer");
        table.prune(Instant::now());
        queue.shrink();
        assert_eq!(table.open.capacity(), 0);
        assert_eq!(queue.state.lock().expect("lock").commands.capacity(), 0);
    }
}
