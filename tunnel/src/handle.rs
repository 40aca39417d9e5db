//! [`TunnelHandle`]: one live tunnel as the KBS sees it, with typed calls into the guest.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rpc_defs::{
    Applied, CloseCode, CredentialBundle, GuestError, GuestServiceRequest, GuestServiceResponse,
    Installed, ProbeKind, ProbeReport, SealedResource,
};
use serde_bytes::ByteBuf;
use tarpc::ServerError;
use tokio::sync::{Semaphore, TryAcquireError, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    calls::{CallQueue, CallResult, Command},
    frame::DEFAULT_MAX_FRAME,
    link::CloseInfo,
    liveness::unix_now_ms,
    observer::TunnelObserver,
    push_key::PushKey,
    rpc::{self, Method},
};

/// Why a call into a guest failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The tunnel is gone (or closing); the guest may come back on a new one.
    #[error("guest disconnected")]
    Disconnected,
    /// No answer before the deadline; the call was abandoned (the guest aborts it too).
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The tunnel already carries as many calls as allowed; retry later.
    #[error("too many calls in flight to this guest")]
    TooManyInFlight,
    /// The guest answered with an error.
    #[error("guest error: {0}")]
    Guest(#[from] GuestError),
    /// Anything else: an argument too large for a frame, the guest aborting the call...
    #[error("transport error: {0}")]
    Transport(String),
}

impl CallError {
    /// Metrics label for this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::TooManyInFlight => "too_many_in_flight",
            Self::Guest(_) => "guest_error",
            Self::Transport(_) => "transport_error",
        }
    }
}

impl From<ServerError> for CallError {
    /// The error tarpc's server in the guest answered with instead of a result.
    fn from(e: ServerError) -> Self {
        if e.kind == std::io::ErrorKind::WouldBlock {
            Self::TooManyInFlight
        } else {
            Self::Transport(format!("guest aborted the call: {}", e.detail))
        }
    }
}

/// Returns a connection epoch greater than every one handed out before in this process, and,
/// seeded from the wall clock in microseconds, greater than those of earlier runs too.
pub fn next_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut current = LAST.load(Ordering::Relaxed);
    loop {
        let next = current.saturating_add(1).max(now_us);
        match LAST.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => current = seen,
        }
    }
}

/// Who is on the other end of a tunnel (identity from the token, the rest from the guest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelInfo {
    /// Attested guest id.
    pub guest_id: String,
    /// Server-chosen session id.
    pub session_id: String,
    /// Attested labels (init-data `[tether] labels`).
    pub labels: crate::labels::Labels,
    /// Daemon instance id (from the guest's Proof; informational).
    pub instance_id: String,
    /// Daemon version (from the guest's Proof; informational).
    pub daemon_version: String,
    /// Services the daemon offers (from the guest's Proof; informational).
    pub services: Vec<String>,
}

/// One live tunnel: who is there, and typed calls into its `GuestService`.
pub struct TunnelHandle {
    /// Attested guest id.
    pub guest_id: String,
    /// Connection epoch, unique and increasing per process (see [`next_epoch`]).
    pub epoch: u64,
    /// Server-chosen session id.
    pub session_id: String,
    /// Attested labels.
    pub labels: crate::labels::Labels,
    /// Daemon instance id (informational).
    pub instance_id: String,
    /// Daemon version (informational).
    pub daemon_version: String,
    /// Services the daemon offers (informational).
    pub services: Vec<String>,
    /// When the tunnel came up.
    pub connected_at: SystemTime,
    last_seen_ms: AtomicU64,
    calls: CallQueue,
    shutdown: CancellationToken,
    close_request: Mutex<Option<CloseInfo>>,
    in_flight: Semaphore,
    max_in_flight: u32,
    max_frame: u32,
    default_deadline: Duration,
    observer: Arc<dyn TunnelObserver>,
    push_key: Option<PushKey>,
}

impl std::fmt::Debug for TunnelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHandle")
            .field("guest_id", &self.guest_id)
            .field("epoch", &self.epoch)
            .field("session_id", &self.session_id)
            .field("labels", &self.labels)
            .field("instance_id", &self.instance_id)
            .field("daemon_version", &self.daemon_version)
            .field("connected_at", &self.connected_at)
            .field("closing", &self.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl TunnelHandle {
    /// A handle with a fresh epoch and an empty call queue. `serve_guest_tunnel` builds these
    /// and runs the task that serves the queue; a handle nobody serves (tests) fails its calls
    /// with `DeadlineExceeded`, or `Disconnected` once closed.
    pub fn new(
        info: TunnelInfo,
        max_in_flight: usize,
        default_deadline: Duration,
        observer: Arc<dyn TunnelObserver>,
    ) -> Self {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            guest_id: info.guest_id,
            epoch: next_epoch(),
            session_id: info.session_id,
            labels: info.labels,
            instance_id: info.instance_id,
            daemon_version: info.daemon_version,
            services: info.services,
            connected_at: SystemTime::now(),
            last_seen_ms: AtomicU64::new(unix_now_ms()),
            calls: CallQueue::default(),
            shutdown: CancellationToken::new(),
            close_request: Mutex::new(None),
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight: u32::try_from(max_in_flight).unwrap_or(u32::MAX),
            max_frame: u32::try_from(DEFAULT_MAX_FRAME).unwrap_or(u32::MAX),
            default_deadline,
            observer,
            push_key: None,
        }
    }

    /// Sets the tunnel's push key (a `tether.v2` challenge carried it) before the handle is shared.
    pub(crate) fn with_push_key(mut self, push_key: Option<PushKey>) -> Self {
        self.push_key = push_key;
        self
    }

    /// The key pushes on this tunnel are sealed to (JWE `dir`), when the guest holds one.
    pub fn push_key(&self) -> Option<&PushKey> {
        self.push_key.as_ref()
    }

    /// Sets the largest request frame (the tunnel's limit) before the handle is shared.
    pub(crate) fn with_max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = u32::try_from(max_frame).unwrap_or(u32::MAX);
        self
    }

    /// When the guest was last heard from (any frame, pong included), Unix milliseconds.
    pub fn last_seen_unix_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn touch(&self) {
        self.last_seen_ms.store(unix_now_ms(), Ordering::Relaxed);
    }

    /// Asks the tunnel's task to close with `code` (e.g. 4409 when superseded); idempotent,
    /// the first code wins.
    pub fn close(&self, code: CloseCode, reason: &str) {
        if let Ok(mut slot) = self.close_request.lock() {
            slot.get_or_insert_with(|| CloseInfo::local(code, reason));
        }
        self.shutdown.cancel();
    }

    /// True once a close was requested or the tunnel ended.
    pub fn is_closed(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves once a close was requested or the tunnel ended.
    pub async fn closed(&self) {
        self.shutdown.cancelled().await;
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn requested_close(&self) -> Option<CloseInfo> {
        self.close_request.lock().ok().and_then(|slot| slot.clone())
    }

    /// The queue the tunnel task serves.
    pub(crate) fn call_queue(&self) -> &CallQueue {
        &self.calls
    }

    /// Ends the tunnel for callers: queued and future calls fail with `Disconnected`.
    pub(crate) fn shut(&self) {
        self.shutdown.cancel();
        self.calls.close();
    }

    /// Calls currently in flight through the typed calls.
    pub fn in_flight(&self) -> usize {
        (self.max_in_flight as usize).saturating_sub(self.in_flight.available_permits())
    }

    /// Echoes `payload` through the guest (liveness, round-trip time).
    pub async fn ping(
        &self,
        payload: Vec<u8>,
        deadline: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let request = GuestServiceRequest::Ping {
            payload: ByteBuf::from(payload),
        };
        self.call(Method::Ping, deadline, request, |resp| match resp {
            GuestServiceResponse::Ping(b) => Some(Ok(b.into_vec())),
            _ => None,
        })
        .await
    }

    /// Installs a credential bundle in the guest.
    pub async fn install_credentials(
        &self,
        bundle: CredentialBundle,
        deadline: Option<Duration>,
    ) -> Result<Installed, CallError> {
        let request = GuestServiceRequest::InstallCredentials { bundle };
        self.call(
            Method::InstallCredentials,
            deadline,
            request,
            |resp| match resp {
                GuestServiceResponse::InstallCredentials(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Pushes a new version of a resource to the guest.
    pub async fn apply_resource(
        &self,
        resource: SealedResource,
        deadline: Option<Duration>,
    ) -> Result<Applied, CallError> {
        let request = GuestServiceRequest::ApplyResource { resource };
        self.call(
            Method::ApplyResource,
            deadline,
            request,
            |resp| match resp {
                GuestServiceResponse::ApplyResource(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Asks the guest for health, held resources or runtime figures.
    pub async fn probe(
        &self,
        kind: ProbeKind,
        deadline: Option<Duration>,
    ) -> Result<ProbeReport, CallError> {
        let request = GuestServiceRequest::Probe { kind };
        self.call(Method::Probe, deadline, request, |resp| match resp {
            GuestServiceResponse::Probe(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Runs one call: in-flight limit, deadline, span, metrics and error mapping.
    async fn call<T>(
        &self,
        method: Method,
        deadline: Option<Duration>,
        request: GuestServiceRequest,
        unpack: fn(GuestServiceResponse) -> Option<Result<T, GuestError>>,
    ) -> Result<T, CallError> {
        let mut record = Record {
            observer: &*self.observer,
            method: method.as_str(),
            start: tokio::time::Instant::now(),
            done: false,
        };
        if self.is_closed() {
            return record.finish(Err(CallError::Disconnected));
        }
        let _permit = match self.in_flight.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                return record.finish(Err(CallError::TooManyInFlight));
            }
            Err(TryAcquireError::Closed) => return record.finish(Err(CallError::Disconnected)),
        };
        let deadline = deadline.unwrap_or(self.default_deadline);
        let span = tracing::debug_span!(
            "rpc",
            rpc = method.as_str(),
            guest_id = %self.guest_id,
            session_id = %self.session_id,
        );
        let result = self
            .exchange(method, deadline, &request)
            .instrument(span)
            .await
            .and_then(|resp| match unpack(resp) {
                Some(Ok(value)) => Ok(value),
                Some(Err(guest)) => Err(CallError::Guest(guest)),
                // The tunnel task checks the method of every answer; this is a bug guard.
                None => Err(CallError::Transport("answer of another method".into())),
            });
        if let Err(e) = &result {
            tracing::debug!(guest_id = %self.guest_id, rpc = method.as_str(), error = %e, "call failed");
        }
        record.finish(result)
    }

    /// Encodes `request`, queues it for the tunnel task and waits for the answer until
    /// `deadline`; on timeout or when dropped, tells the task to cancel it in the guest.
    async fn exchange(
        &self,
        method: Method,
        deadline: Duration,
        request: &GuestServiceRequest,
    ) -> Result<GuestServiceResponse, CallError> {
        let id = self.calls.next_id();
        let bytes = rpc::encode_request(id, deadline, request, self.max_frame as usize)
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let (reply, answer) = oneshot::channel::<CallResult>();
        let cmd = Command::Call {
            id,
            method,
            bytes,
            reply,
        };
        if self.calls.push(cmd).is_err() {
            return Err(CallError::Disconnected);
        }
        let mut guard = CancelOnDrop {
            calls: &self.calls,
            id,
            armed: true,
        };
        match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(result)) => {
                guard.armed = false;
                result.map_err(CallError::from)
            }
            Ok(Err(_)) => {
                // The tunnel ended with the call unanswered.
                guard.armed = false;
                Err(CallError::Disconnected)
            }
            Err(_) => Err(CallError::DeadlineExceeded),
        }
    }
}

/// Tells the tunnel task to cancel a call its caller no longer waits for.
struct CancelOnDrop<'a> {
    calls: &'a CallQueue,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Refused only once the tunnel ended, when there is nothing left to cancel.
            let _ = self.calls.push(Command::Cancel { id: self.id });
        }
    }
}

/// Reports a call's outcome once: at its end, or as `cancelled` if the caller dropped it.
struct Record<'a> {
    observer: &'a dyn TunnelObserver,
    method: &'static str,
    start: tokio::time::Instant,
    done: bool,
}

impl Record<'_> {
    fn finish<T>(&mut self, result: Result<T, CallError>) -> Result<T, CallError> {
        self.done = true;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.observer
            .rpc(self.method, outcome, self.start.elapsed());
        result
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.observer
                .rpc(self.method, "cancelled", self.start.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase() {
        let a = next_epoch();
        let b = next_epoch();
        assert!(b > a);
    }

    #[test]
    fn server_errors_map_to_call_errors() {
        assert_eq!(
            CallError::from(ServerError::new(
                std::io::ErrorKind::WouldBlock,
                "server throttled the request.".into()
            )),
            CallError::TooManyInFlight
        );
        assert!(matches!(
            CallError::from(ServerError::new(
                std::io::ErrorKind::InvalidData,
                "too big".into()
            )),
            CallError::Transport(_)
        ));
    }

    fn detached() -> TunnelHandle {
        TunnelHandle::new(
            TunnelInfo {
                guest_id: "g".into(),
                ..TunnelInfo::default()
            },
            2,
            Duration::from_secs(5),
            Arc::new(crate::observer::NoopObserver),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_call_times_out_cancels_and_frees_its_slot() {
        let handle = detached();
        let err = handle
            .ping(vec![1], Some(Duration::from_secs(3)))
            .await
            .expect_err("nobody answers");
        assert_eq!(err, CallError::DeadlineExceeded);
        assert_eq!(handle.in_flight(), 0);
        // The call, then its cancel, wait for the task.
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(matches!(
            handle.calls.poll_pop(&mut cx),
            std::task::Poll::Ready(Command::Call { .. })
        ));
        assert!(matches!(
            handle.calls.poll_pop(&mut cx),
            std::task::Poll::Ready(Command::Cancel { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_limit_refuses_extra_calls_at_once() {
        let handle = Arc::new(detached());
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let h = handle.clone();
            waiting.push(tokio::spawn(async move { h.ping(vec![], None).await }));
        }
        tokio::task::yield_now().await;
        assert_eq!(handle.in_flight(), 2);
        assert_eq!(
            handle.ping(vec![], None).await,
            Err(CallError::TooManyInFlight)
        );
        // Shutting the tunnel fails the waiting calls with Disconnected, not a timeout.
        handle.shut();
        for w in waiting {
            assert_eq!(w.await.expect("join"), Err(CallError::Disconnected));
        }
        assert_eq!(
            handle.ping(vec![], None).await,
            Err(CallError::Disconnected)
        );
    }

    #[tokio::test]
    async fn an_oversize_argument_fails_alone() {
        let handle = detached().with_max_frame(4096);
        assert!(matches!(
            handle.ping(vec![0; 10_000], None).await,
            Err(CallError::Transport(_))
        ));
        assert_eq!(handle.in_flight(), 0);
    }
}
