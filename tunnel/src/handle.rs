//! [`TunnelHandle`]: one live tunnel as the KBS sees it, with typed calls into the guest.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH},
};

use rpc_defs::{
    Applied, CloseCode, CredentialBundle, GuestError, GuestServiceClient, Installed, ProbeKind,
    ProbeReport, SealedResource,
};
use tarpc::client::RpcError;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{link::CloseInfo, liveness::unix_now_ms, observer::TunnelObserver, rpc::Method};

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

impl From<RpcError> for CallError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::Shutdown | RpcError::Channel(_) => Self::Disconnected,
            RpcError::DeadlineExceeded => Self::DeadlineExceeded,
            RpcError::Send(e) => Self::Transport(e.to_string()),
            RpcError::Server(e) if e.kind == std::io::ErrorKind::WouldBlock => {
                Self::TooManyInFlight
            }
            RpcError::Server(e) => Self::Transport(format!("guest aborted the call: {}", e.detail)),
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
    pub labels: BTreeMap<String, String>,
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
    pub labels: BTreeMap<String, String>,
    /// Daemon instance id (informational).
    pub instance_id: String,
    /// Daemon version (informational).
    pub daemon_version: String,
    /// Services the daemon offers (informational).
    pub services: Vec<String>,
    /// When the tunnel came up.
    pub connected_at: SystemTime,
    last_seen_ms: AtomicU64,
    client: GuestServiceClient,
    shutdown: CancellationToken,
    close_request: Mutex<Option<CloseInfo>>,
    in_flight: Semaphore,
    max_in_flight: usize,
    default_deadline: Duration,
    observer: Arc<dyn TunnelObserver>,
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
    /// A handle over `client` with a fresh epoch; `serve_guest_tunnel` builds these, tests and
    /// custom transports may too.
    pub fn new(
        info: TunnelInfo,
        client: GuestServiceClient,
        max_in_flight: usize,
        default_deadline: Duration,
        observer: Arc<dyn TunnelObserver>,
    ) -> Self {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
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
            client,
            shutdown: CancellationToken::new(),
            close_request: Mutex::new(None),
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight,
            default_deadline,
            observer,
        }
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

    /// The raw tarpc client: no in-flight limit, default deadline or metrics. Prefer the
    /// typed calls below.
    pub fn client(&self) -> &GuestServiceClient {
        &self.client
    }

    /// Calls currently in flight through the typed calls.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits())
    }

    /// Echoes `payload` through the guest (liveness, round-trip time).
    pub async fn ping(
        &self,
        payload: Vec<u8>,
        deadline: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let payload = serde_bytes::ByteBuf::from(payload);
        self.call(Method::Ping, deadline, move |c, ctx| async move {
            c.ping(ctx, payload).await.map(|b| Ok(b.into_vec()))
        })
        .await
    }

    /// Installs a credential bundle in the guest.
    pub async fn install_credentials(
        &self,
        bundle: CredentialBundle,
        deadline: Option<Duration>,
    ) -> Result<Installed, CallError> {
        self.call(
            Method::InstallCredentials,
            deadline,
            move |c, ctx| async move { c.install_credentials(ctx, bundle).await },
        )
        .await
    }

    /// Pushes a new version of a resource to the guest.
    pub async fn apply_resource(
        &self,
        resource: SealedResource,
        deadline: Option<Duration>,
    ) -> Result<Applied, CallError> {
        self.call(Method::ApplyResource, deadline, move |c, ctx| async move {
            c.apply_resource(ctx, resource).await
        })
        .await
    }

    /// Asks the guest for health, held resources or runtime figures.
    pub async fn probe(
        &self,
        kind: ProbeKind,
        deadline: Option<Duration>,
    ) -> Result<ProbeReport, CallError> {
        self.call(Method::Probe, deadline, move |c, ctx| async move {
            c.probe(ctx, kind).await
        })
        .await
    }

    /// Runs one call: in-flight limit, deadline, span, metrics and error mapping.
    async fn call<T, F, Fut>(
        &self,
        method: Method,
        deadline: Option<Duration>,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(GuestServiceClient, tarpc::context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, GuestError>, RpcError>>,
    {
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
        let result = async {
            let mut ctx = tarpc::context::current();
            ctx.deadline = StdInstant::now() + deadline;
            // tarpc enforces the deadline itself; the outer timeout only guards against a
            // dispatch that is no longer polled.
            match tokio::time::timeout(
                deadline + Duration::from_secs(1),
                f(self.client.clone(), ctx),
            )
            .await
            {
                Ok(Ok(Ok(value))) => Ok(value),
                Ok(Ok(Err(guest))) => Err(CallError::Guest(guest)),
                Ok(Err(rpc)) => Err(CallError::from(rpc)),
                Err(_) => Err(CallError::DeadlineExceeded),
            }
        }
        .instrument(span)
        .await;
        if let Err(e) = &result {
            tracing::debug!(guest_id = %self.guest_id, rpc = method.as_str(), error = %e, "call failed");
        }
        record.finish(result)
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
    fn rpc_errors_map_to_call_errors() {
        assert_eq!(CallError::from(RpcError::Shutdown), CallError::Disconnected);
        assert_eq!(
            CallError::from(RpcError::DeadlineExceeded),
            CallError::DeadlineExceeded
        );
        assert_eq!(
            CallError::from(RpcError::Server(tarpc::ServerError::new(
                std::io::ErrorKind::WouldBlock,
                "server throttled the request.".into()
            ))),
            CallError::TooManyInFlight
        );
        assert!(matches!(
            CallError::from(RpcError::Server(tarpc::ServerError::new(
                std::io::ErrorKind::InvalidData,
                "too big".into()
            ))),
            CallError::Transport(_)
        ));
    }
}
