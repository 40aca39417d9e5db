//! The daemon's local endpoints, beside the tunnel: the CDH-compatible resource endpoint and
//! the splitapi endpoint. They follow the daemon's shutdown token and are waited for at the
//! end of the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::service::GuestDaemonService;
use crate::splitapi::{GuestIdentity, SplitApiConfig, SplitApiStatus};

/// Longest wait for an endpoint to stop: its connections get a 5 s drain, plus slack.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The running endpoints; dropping this aborts them.
pub(super) struct LocalEndpoints {
    tasks: Vec<AbortOnDropHandle<()>>,
    shutdown: CancellationToken,
}

impl LocalEndpoints {
    /// None yet; each starts with its own method and stops on `shutdown`.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tasks: Vec::new(),
            shutdown,
        }
    }

    /// Serve the CDH-compatible endpoint of `service`'s store on `listen`, publishing the
    /// bound address on `addr`.
    pub fn start_cdh(
        &mut self,
        listen: SocketAddr,
        service: &GuestDaemonService,
        addr: watch::Sender<Option<SocketAddr>>,
    ) {
        self.tasks
            .push(AbortOnDropHandle::new(tokio::spawn(crate::cdh::run(
                listen,
                Arc::clone(service.store()),
                addr,
                self.shutdown.clone(),
            ))));
    }

    /// Serve the splitapi endpoint once `service` holds its credentials.
    pub fn start_splitapi(
        &mut self,
        config: SplitApiConfig,
        service: &GuestDaemonService,
        identity: watch::Receiver<GuestIdentity>,
        status: watch::Sender<SplitApiStatus>,
    ) {
        self.tasks
            .push(AbortOnDropHandle::new(tokio::spawn(crate::splitapi::run(
                config,
                service.clone(),
                identity,
                status,
                self.shutdown.clone(),
            ))));
    }

    /// Wait for each endpoint to stop (the shutdown token must be cancelled by now).
    pub async fn stopped(self) {
        for task in self.tasks {
            if timeout(STOP_WAIT, task).await.is_err() {
                tracing::warn!("a local endpoint did not stop in time");
            }
        }
    }
}
