//! A configurable `GuestService` for tests and load tools: sensible answers by default, any
//! call overridable with a closure.

use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use rpc_defs::{
    Applied, CredentialBundle, GuestError, GuestService, HealthReport, Installed, ProbeKind,
    ProbeReport, SealedResource,
};
use serde_bytes::ByteBuf;
use tarpc::context::Context;

type Handler<A, R> = Arc<dyn Fn(A) -> BoxFuture<'static, R> + Send + Sync>;

fn handler<A, R, F, Fut>(f: F) -> Handler<A, R>
where
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    Arc::new(move |arg| f(arg).boxed())
}

/// A guest service: `ping` echoes, `probe` reports a healthy guest, `install_credentials` and
/// `apply_resource` acknowledge; [`on_install`](Self::on_install),
/// [`on_apply`](Self::on_apply) and [`on_probe`](Self::on_probe) replace an answer (a
/// closure returning a future, so it may also never answer).
///
/// ```ignore
/// let guest = StubGuest::new().on_probe(|kind| async move {
///     match kind {
///         ProbeKind::Resources => std::future::pending().await,
///         _ => Ok(ProbeReport::default()),
///     }
/// });
/// ```
#[derive(Clone, Default)]
pub struct StubGuest {
    install: Option<Handler<CredentialBundle, Result<Installed, GuestError>>>,
    apply: Option<Handler<SealedResource, Result<Applied, GuestError>>>,
    probe: Option<Handler<ProbeKind, Result<ProbeReport, GuestError>>>,
}

impl StubGuest {
    /// The defaults: echo, healthy, acknowledge.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers `install_credentials` with `f(bundle)`.
    pub fn on_install<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(CredentialBundle) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Installed, GuestError>> + Send + 'static,
    {
        self.install = Some(handler(f));
        self
    }

    /// Answers `apply_resource` with `f(resource)`.
    pub fn on_apply<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(SealedResource) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Applied, GuestError>> + Send + 'static,
    {
        self.apply = Some(handler(f));
        self
    }

    /// Answers `probe` with `f(kind)`.
    pub fn on_probe<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(ProbeKind) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ProbeReport, GuestError>> + Send + 'static,
    {
        self.probe = Some(handler(f));
        self
    }

    /// Refuses every pushed resource as unsupported (naming its URI).
    pub fn refusing_pushes(self) -> Self {
        self.on_apply(|r| async move { Err(GuestError::Unsupported(r.uri)) })
    }

    /// Refuses every credential bundle as unsupported (naming its id).
    pub fn refusing_bundles(self) -> Self {
        self.on_install(|b| async move { Err(GuestError::Unsupported(b.id)) })
    }
}

impl GuestService for StubGuest {
    async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
        payload
    }

    async fn install_credentials(
        self,
        _: Context,
        bundle: CredentialBundle,
    ) -> Result<Installed, GuestError> {
        match &self.install {
            Some(f) => f(bundle).await,
            None => Ok(installed(&bundle)),
        }
    }

    async fn apply_resource(
        self,
        _: Context,
        resource: SealedResource,
    ) -> Result<Applied, GuestError> {
        match &self.apply {
            Some(f) => f(resource).await,
            None => Ok(acknowledge(resource)),
        }
    }

    async fn probe(self, _: Context, kind: ProbeKind) -> Result<ProbeReport, GuestError> {
        match &self.probe {
            Some(f) => f(kind).await,
            None => Ok(ProbeReport {
                health: Some(healthy()),
                ..ProbeReport::default()
            }),
        }
    }
}

/// A healthy guest's health report.
pub fn healthy() -> HealthReport {
    HealthReport {
        healthy: true,
        problems: Vec::new(),
    }
}

/// What a guest answers when it applied `resource` (not held before, no hook).
pub fn acknowledge(resource: SealedResource) -> Applied {
    Applied {
        uri: resource.uri,
        version: resource.version,
        sha256: resource.sha256,
        already_held: false,
        hook_status: None,
    }
}

/// What a guest answers when it installed `bundle` (not held before).
pub fn installed(bundle: &CredentialBundle) -> Installed {
    Installed {
        id: bundle.id.clone(),
        version: bundle.version,
        already_held: false,
    }
}
