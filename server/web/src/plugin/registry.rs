//! [`PluginRegistry`]: the fixed set of plugins, which of them are enabled, their routes
//! (gated), their background tasks and their tunnel-event workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::IntoResponse;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kbs_core::storage::{PluginStateStore, StoreError};
use prometheus_client::registry::Registry;

use super::{
    Plugin, PluginContext, PluginKind, PluginServices, PluginSetupError, PluginSpec, RESERVED_NAMES,
};
use crate::error::ApiError;

/// How long disable waits for a plugin's tasks to finish before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Registry set-up and enable/disable errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No plugin has this name.
    #[error("no plugin named `{0}`")]
    Unknown(String),
    /// Two plugins share a name, or a name is reserved or malformed.
    #[error("plugin name `{0}`: {1}")]
    BadName(String, &'static str),
    /// A `[plugins]` configuration key is wrong (it is named).
    #[error(transparent)]
    Config(#[from] PluginSetupError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Unknown(_) => ApiError::not_found("PluginNotFound", e.to_string()),
            RegistryError::BadName(..) | RegistryError::Config(_) => {
                ApiError::internal("plugin registry", e)
            }
            RegistryError::Store(s) => s.into(),
        }
    }
}

/// One row of `GET /kbs/v0/plugin`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PluginInfo {
    /// Name (URL segment).
    pub name: String,
    /// Primary kind.
    pub kind: PluginKind,
    /// Every kind it implements.
    pub kinds: Vec<PluginKind>,
    /// Whether it is enabled now.
    pub enabled: bool,
    /// Plugin version.
    pub version: String,
    /// Run-time settings (see [`Plugin::settings`]), when it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

struct Running {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

struct Entry {
    plugin: Arc<dyn Plugin>,
    enabled: Arc<AtomicBool>,
    ctx: PluginContext,
    running: tokio::sync::Mutex<Option<Running>>,
}

/// The plugins of this KBS and their state.
pub struct PluginRegistry {
    entries: Vec<Entry>,
    services: PluginServices,
    states: Arc<dyn PluginStateStore>,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("plugins", &self.list())
            .finish_non_exhaustive()
    }
}

/// `[a-z0-9-]+`, or two such segments `<family>/<member>` (an external plugin is
/// `external/<name>`, mounted at `/kbs/v0/external/<name>`), at most 64 bytes.
fn valid_name(name: &str) -> bool {
    let segment = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 64 && {
        let mut parts = name.split('/');
        parts.clone().count() <= 2 && parts.all(segment)
    }
}

fn check_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), RegistryError> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !valid_name(name) {
            return Err(RegistryError::BadName(
                name.into(),
                "must be [a-z0-9-]{1,64}, or <family>/<member> of such segments",
            ));
        }
        let first = name.split('/').next().unwrap_or(name);
        if RESERVED_NAMES.contains(&first) {
            return Err(RegistryError::BadName(name.into(), "is a core endpoint"));
        }
        if !seen.insert(name) {
            return Err(RegistryError::BadName(name.into(), "is used twice"));
        }
    }
    // `a` and `a/b` would both claim `/kbs/v0/a/b/...`.
    for name in &seen {
        if let Some((family, _)) = name.split_once('/')
            && seen.contains(family)
        {
            return Err(RegistryError::BadName(
                (*name).into(),
                "is inside another plugin's routes",
            ));
        }
    }
    Ok(())
}

fn unknown_key(key: String, name: &str, known: &[&str]) -> RegistryError {
    RegistryError::Config(PluginSetupError {
        key,
        reason: format!("no plugin named `{name}` (known: {})", known.join(", ")),
    })
}

impl PluginRegistry {
    /// Build the plugins of `specs` (each with its `[plugins.<name>]` section from
    /// `sections`, its metrics in `metrics`), then apply `[plugins] disabled` defaults and
    /// the stored decisions (stored ones win). Names must be unique, `[a-z0-9-]+` and not
    /// core endpoints; a section or a disabled name that names no plugin is refused.
    pub async fn build(
        specs: Vec<PluginSpec>,
        mut sections: BTreeMap<String, toml::Value>,
        disabled: &[String],
        metrics: &mut Registry,
        services: PluginServices,
        states: Arc<dyn PluginStateStore>,
    ) -> Result<Self, RegistryError> {
        let names: Vec<&'static str> = specs.iter().map(PluginSpec::name).collect();
        check_names(names.iter().copied())?;
        if let Some(name) = sections.keys().find(|n| !names.contains(&n.as_str())) {
            return Err(unknown_key(format!("plugins.{name}"), name, &names));
        }
        for (i, name) in disabled.iter().enumerate() {
            if !names.contains(&name.as_str()) {
                return Err(unknown_key(format!("plugins.disabled[{i}]"), name, &names));
            }
        }
        let mut plugins = Vec::with_capacity(specs.len());
        for spec in specs {
            let section = sections.remove(spec.name());
            plugins.push(spec.build(section, metrics)?);
        }
        Self::new(plugins, disabled, services, states).await
    }

    /// The registry of plugins already built (see [`build`](Self::build)).
    pub async fn new(
        plugins: Vec<Arc<dyn Plugin>>,
        disabled: &[String],
        services: PluginServices,
        states: Arc<dyn PluginStateStore>,
    ) -> Result<Self, RegistryError> {
        check_names(plugins.iter().map(|p| p.name()))?;
        if let Some(name) = disabled
            .iter()
            .find(|d| !plugins.iter().any(|p| p.name() == d.as_str()))
        {
            return Err(RegistryError::Unknown(name.clone()));
        }
        let stored = states.plugin_states().await?;
        let entries = plugins
            .into_iter()
            .map(|plugin| {
                let name = plugin.name();
                let on = stored
                    .iter()
                    .find(|s| s.name == name)
                    .map(|s| s.enabled)
                    .unwrap_or_else(|| !disabled.iter().any(|d| d == name));
                let enabled = Arc::new(AtomicBool::new(on));
                Entry {
                    ctx: PluginContext::new(name, enabled.clone(), services.clone()),
                    plugin,
                    enabled,
                    running: tokio::sync::Mutex::new(None),
                }
            })
            .collect::<Vec<_>>();
        for s in &stored {
            if !entries.iter().any(|e| e.plugin.name() == s.name) {
                tracing::warn!(plugin = %s.name, "stored state for a plugin this KBS does not have; ignored");
            }
        }
        Ok(Self {
            entries,
            services,
            states,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry, RegistryError> {
        self.entries
            .iter()
            .find(|e| e.plugin.name() == name)
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))
    }

    /// Whether `name` is a known, enabled plugin.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.entry(name)
            .map(|e| e.enabled.load(Ordering::Acquire))
            .unwrap_or(false)
    }

    /// Every plugin, in registration order.
    pub fn list(&self) -> Vec<PluginInfo> {
        self.entries
            .iter()
            .map(|e| PluginInfo {
                name: e.plugin.name().to_string(),
                kind: e.plugin.kind(),
                kinds: e.plugin.kinds(),
                enabled: e.enabled.load(Ordering::Acquire),
                version: e.plugin.version().to_string(),
                settings: e.plugin.settings(),
            })
            .collect()
    }

    /// Every plugin's routes under `/kbs/v0/<name>`, answering 404 while it is disabled.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let mut router = Router::new();
        for e in &self.entries {
            let name = e.plugin.name();
            let gate = e.enabled.clone();
            let routes = e
                .plugin
                .routes(e.ctx.clone())
                .layer(axum::middleware::from_fn(
                    move |req: Request, next: Next| {
                        let open = gate.load(Ordering::Acquire);
                        async move {
                            if open {
                                next.run(req).await
                            } else {
                                ApiError::not_found(
                                    "PluginDisabled",
                                    format!("plugin `{name}` is disabled"),
                                )
                                .into_response()
                            }
                        }
                    },
                ));
            router = router.nest(&format!("/kbs/v0/{name}"), routes.with_state(()));
        }
        router
    }

    /// Start every enabled plugin's tasks. Call once, when serving begins.
    pub async fn start_all(&self) {
        for e in &self.entries {
            if e.enabled.load(Ordering::Acquire) {
                let mut running = e.running.lock().await;
                if running.is_none() {
                    *running = Some(spawn(e, &self.services));
                }
            }
        }
    }

    /// Enable or disable `name`, persist the decision, start or stop its tasks. Returns
    /// whether anything changed.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        actor: &str,
    ) -> Result<bool, RegistryError> {
        let e = self.entry(name)?;
        let mut running = e.running.lock().await;
        self.states.set_plugin_enabled(name, enabled, actor).await?;
        let changed = self.put_in_force(e, &mut running, enabled).await;
        if changed {
            tracing::info!(plugin = name, enabled, actor, "plugin state changed");
        }
        Ok(changed)
    }

    /// Puts the stored states in force (another replica sharing the database changed
    /// them): plugins are started or stopped as stored, nothing is written.
    pub async fn follow_stored(&self) -> Result<(), RegistryError> {
        for row in self.states.plugin_states().await? {
            let Ok(e) = self.entry(&row.name) else {
                continue;
            };
            let mut running = e.running.lock().await;
            if self.put_in_force(e, &mut running, row.enabled).await {
                tracing::info!(
                    plugin = %row.name,
                    enabled = row.enabled,
                    by = %row.updated_by,
                    "plugin state changed by another replica"
                );
            }
        }
        Ok(())
    }

    /// Enables or disables `e` here (its `running` slot locked by the caller); whether
    /// anything changed.
    async fn put_in_force(&self, e: &Entry, running: &mut Option<Running>, enabled: bool) -> bool {
        if e.enabled.load(Ordering::Acquire) == enabled {
            return false;
        }
        e.enabled.store(enabled, Ordering::Release);
        if enabled {
            if running.is_none() {
                *running = Some(spawn(e, &self.services));
            }
        } else if let Some(r) = running.take() {
            stop(e.plugin.name(), r).await;
        }
        true
    }

    /// Change `name`'s run-time settings (see [`Plugin::configure`]); returns them as they
    /// are now. The caller audits.
    pub async fn configure(
        &self,
        name: &str,
        settings: serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        let e = self.entry(name)?;
        let now = e.plugin.configure(&e.ctx, settings).await?;
        tracing::info!(plugin = name, settings = %now, "plugin settings changed");
        Ok(now)
    }

    /// Stop every plugin's tasks (shutdown).
    pub async fn stop_all(&self) {
        for e in &self.entries {
            if let Some(r) = e.running.lock().await.take() {
                stop(e.plugin.name(), r).await;
            }
        }
    }
}

fn spawn(e: &Entry, services: &PluginServices) -> Running {
    let stop = services.shutdown.child_token();
    let ctx = e.ctx.clone();
    let mut tasks = Vec::new();
    {
        let plugin = e.plugin.clone();
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { plugin.start(ctx, stop).await }));
    }
    if e.plugin.kinds().contains(&PluginKind::ServerRequest) {
        // Subscribe before resyncing, so nothing between the two is missed.
        let events = services.hub.subscribe();
        let plugin = e.plugin.clone();
        tasks.push(tokio::spawn(event_loop(plugin, ctx, events, stop.clone())));
    }
    Running { stop, tasks }
}

async fn stop(name: &str, r: Running) {
    r.stop.cancel();
    for mut t in r.tasks {
        if tokio::time::timeout(STOP_GRACE, &mut t).await.is_err() {
            tracing::warn!(plugin = name, "plugin task did not stop in time; aborted");
            t.abort();
        }
    }
}

async fn event_loop(
    plugin: Arc<dyn Plugin>,
    ctx: PluginContext,
    mut events: tokio::sync::broadcast::Receiver<tunnel::TunnelEvent>,
    stop: CancellationToken,
) {
    let name = plugin.name();
    tokio::select! {
        biased;
        _ = stop.cancelled() => return,
        _ = plugin.resync(&ctx) => {}
    }
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(event) => {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = plugin.on_event(&ctx, &event) => {}
                }
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    plugin = name,
                    missed,
                    "plugin fell behind tunnel events; resyncing"
                );
                ctx.count("plugin.resync", "lagged");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = plugin.resync(&ctx) => {}
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;
    use crate::plugin::test_services;

    struct Fake {
        events: Mutex<Vec<String>>,
        resyncs: AtomicUsize,
        running: AtomicUsize,
        gate: tokio::sync::Semaphore,
        seen: tokio::sync::Notify,
    }

    impl Default for Fake {
        fn default() -> Self {
            Self {
                events: Mutex::default(),
                resyncs: AtomicUsize::new(0),
                running: AtomicUsize::new(0),
                gate: tokio::sync::Semaphore::new(0),
                seen: tokio::sync::Notify::new(),
            }
        }
    }

    struct FakePlugin(Arc<Fake>);

    #[async_trait]
    impl Plugin for FakePlugin {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn kind(&self) -> PluginKind {
            PluginKind::ServerRequest
        }
        fn routes(&self, ctx: PluginContext) -> Router {
            Router::new()
                .route("/hello", get(|| async { "hi" }))
                .with_state(ctx)
        }
        async fn start(&self, _ctx: PluginContext, stop: CancellationToken) {
            self.0.running.fetch_add(1, Ordering::SeqCst);
            stop.cancelled().await;
            self.0.running.fetch_sub(1, Ordering::SeqCst);
        }
        async fn on_event(&self, _ctx: &PluginContext, event: &tunnel::TunnelEvent) {
            let _permit = self.0.gate.acquire().await.unwrap();
            let text = match event {
                tunnel::TunnelEvent::Connected(h) => format!("+{}", h.guest_id),
                tunnel::TunnelEvent::Disconnected { guest_id, .. } => format!("-{guest_id}"),
            };
            self.0.events.lock().unwrap().push(text);
            self.0.seen.notify_waiters();
        }
        async fn resync(&self, _ctx: &PluginContext) {
            self.0.resyncs.fetch_add(1, Ordering::SeqCst);
            self.0.seen.notify_waiters();
        }
    }

    fn handle(id: &str) -> Arc<tunnel::TunnelHandle> {
        Arc::new(tunnel::TunnelHandle::new(
            tunnel::TunnelInfo {
                guest_id: id.into(),
                ..Default::default()
            },
            4,
            Duration::from_secs(1),
            Arc::new(tunnel::NoopObserver),
        ))
    }

    struct Kbs {
        plugins: PluginRegistry,
        hub: tunnel::Hub,
        states: Arc<dyn PluginStateStore>,
    }

    async fn state_with(fake: Arc<Fake>, disabled: Vec<String>) -> Kbs {
        let (mut services, store) = test_services().await;
        services.hub = tunnel::Hub::with_event_capacity(4);
        let plugins: Vec<Arc<dyn Plugin>> = vec![Arc::new(FakePlugin(fake))];
        let hub = services.hub.clone();
        let states: Arc<dyn PluginStateStore> = store;
        let plugins = PluginRegistry::new(plugins, &disabled, services, states.clone())
            .await
            .unwrap();
        Kbs {
            plugins,
            hub,
            states,
        }
    }

    async fn until(fake: &Fake, cond: impl Fn(&Fake) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = fake.seen.notified();
                if cond(fake) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("condition reached in time");
    }

    #[tokio::test]
    async fn events_only_while_enabled_and_lag_triggers_resync() {
        let fake = Arc::new(Fake::default());
        fake.gate.add_permits(1000);
        let state = state_with(fake.clone(), vec![]).await;
        state.plugins.start_all().await;
        until(&fake, |f| f.resyncs.load(Ordering::SeqCst) == 1).await;
        assert_eq!(fake.running.load(Ordering::SeqCst), 1);

        let a = handle("a");
        state.hub.register(a.clone());
        until(&fake, |f| f.events.lock().unwrap().len() == 1).await;

        // Disabled: no events, task stopped, routes 404.
        assert!(
            state
                .plugins
                .set_enabled("fake", false, "t@x")
                .await
                .unwrap()
        );
        assert_eq!(fake.running.load(Ordering::SeqCst), 0);
        state.hub.register(handle("b"));
        let app: Router = state.plugins.router();
        let resp = app
            .clone()
            .oneshot(
                Request::get("/kbs/v0/fake/hello")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(fake.events.lock().unwrap().clone(), vec!["+a"]);

        // Enabled again: resync, events flow, routes answer.
        assert!(
            state
                .plugins
                .set_enabled("fake", true, "t@x")
                .await
                .unwrap()
        );
        assert!(
            !state
                .plugins
                .set_enabled("fake", true, "t@x")
                .await
                .unwrap()
        );
        until(&fake, |f| f.resyncs.load(Ordering::SeqCst) == 2).await;
        let resp = app
            .oneshot(
                Request::get("/kbs/v0/fake/hello")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);

        // Hold the worker inside on_event, overflow the 4-event buffer: it must resync.
        let held = fake.gate.acquire_many(1000).await.unwrap();
        state.hub.register(handle("c"));
        tokio::task::yield_now().await;
        for i in 0..10 {
            state.hub.register(handle(&format!("x{i}")));
        }
        drop(held);
        until(&fake, |f| f.resyncs.load(Ordering::SeqCst) == 3).await;
        state.plugins.stop_all().await;
        assert_eq!(fake.running.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn state_is_stored_and_config_default_applies_until_then() {
        let fake = Arc::new(Fake::default());
        let state = state_with(fake.clone(), vec!["fake".into()]).await;
        assert!(!state.plugins.is_enabled("fake"));
        assert!(!state.plugins.list()[0].enabled);
        state
            .plugins
            .set_enabled("fake", true, "t@x")
            .await
            .unwrap();
        let err = state
            .plugins
            .set_enabled("nope", true, "t@x")
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unknown(_)));
        // A new registry over the same store: the stored decision wins over the config.
        let (services, _) = test_services().await;
        let reloaded = PluginRegistry::new(
            vec![Arc::new(FakePlugin(fake))],
            &["fake".into()],
            services,
            state.states.clone(),
        )
        .await
        .unwrap();
        assert!(reloaded.is_enabled("fake"));
        state.plugins.stop_all().await;
    }

    #[tokio::test]
    async fn a_plugin_without_routes_mounts_nothing() {
        struct Quiet;
        impl Plugin for Quiet {
            fn name(&self) -> &'static str {
                "quiet"
            }
            fn kind(&self) -> PluginKind {
                PluginKind::ServerRequest
            }
        }
        let (services, store) = test_services().await;
        let plugins: Vec<Arc<dyn Plugin>> = vec![Arc::new(Quiet)];
        let registry = PluginRegistry::new(plugins, &[], services, store)
            .await
            .unwrap();
        let app: Router = registry.router();
        let resp = app
            .oneshot(Request::get("/kbs/v0/quiet/x").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn bad_names_are_refused() {
        struct Named(&'static str);
        impl Plugin for Named {
            fn name(&self) -> &'static str {
                self.0
            }
            fn kind(&self) -> PluginKind {
                PluginKind::Admin
            }
        }
        for names in [
            vec!["auth"],
            vec!["Bad"],
            vec!["a", "a"],
            vec![""],
            vec!["a/b/c"],
            vec!["a/"],
            vec!["auth/x"],
            vec!["a", "a/b"],
        ] {
            let (services, store) = test_services().await;
            let plugins: Vec<Arc<dyn Plugin>> = names
                .into_iter()
                .map(|n| Arc::new(Named(n)) as Arc<dyn Plugin>)
                .collect();
            let r = PluginRegistry::new(plugins, &[], services, store).await;
            assert!(matches!(r, Err(RegistryError::BadName(..))));
        }
    }

    #[tokio::test]
    async fn sections_and_disabled_names_must_name_a_plugin() {
        let spec = || vec![PluginSpec::new("hello", |_| Ok(Quietly))];
        let section = |name: &str| {
            BTreeMap::from([(name.to_string(), toml::Value::Table(toml::Table::new()))])
        };
        let build = |specs, sections, disabled: Vec<String>| async move {
            let (services, store) = test_services().await;
            PluginRegistry::build(
                specs,
                sections,
                &disabled,
                &mut Registry::default(),
                services,
                store,
            )
            .await
        };
        let ok = build(spec(), section("hello"), vec!["hello".into()])
            .await
            .unwrap();
        assert!(!ok.is_enabled("hello"));
        let Err(RegistryError::Config(e)) = build(spec(), section("nope"), vec![]).await else {
            panic!("an unknown section must be refused");
        };
        assert_eq!(e.key, "plugins.nope");
        assert!(e.reason.contains("known: hello"), "{e}");
        let Err(RegistryError::Config(e)) =
            build(spec(), BTreeMap::new(), vec!["hello".into(), "x".into()]).await
        else {
            panic!("an unknown disabled name must be refused");
        };
        assert_eq!(e.key, "plugins.disabled[1]");
    }

    struct Quietly;
    impl Plugin for Quietly {
        fn name(&self) -> &'static str {
            "hello"
        }
        fn kind(&self) -> PluginKind {
            PluginKind::Admin
        }
    }
}
