//! [`GuestDaemonService`]: the daemon's side of the `GuestService` RPCs the KBS
//! calls over the tunnel. It opens each sealed payload with the TEE key, checks
//! it, commits it to the [`StateStore`] and reports what it now holds.
//!
//! Writes to one resource (or bundle) are serialised by a per-key async lock
//! held across the store write and the hook, so two pushes of different
//! versions cannot interleave and hooks run in commit order. The store write
//! and the hook run in a detached task: if the KBS gives up on a call (its
//! deadline), the commit and hook still finish, so a replay that reports
//! `already_held` never hides a hook that was cut short.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rpc_defs::{
    Applied, BUNDLE_BINDING_HEADER, BundleBinding, CredentialBundle, GuestError, GuestService,
    HealthReport, HeldResource, Installed, ProbeKind, ProbeReport, RESOURCE_BINDING_HEADER,
    ResourceBinding, RuntimeReport, SealedResource,
};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tarpc::context::Context;
use tokio::sync::{OwnedMutexGuard, watch};
use zeroize::Zeroizing;

use crate::hook::PostApplyHook;
use crate::resource_path::ResourcePath;
use crate::store::{self, BundleFile, CREDENTIALS_URI_PREFIX, StateStore, StoreError};
use crate::tee_key::TeeKeyPair;

/// Held credential bundles (id -> version), as published to subscribers.
pub type CredentialVersions = BTreeMap<String, u64>;

/// The `GuestService` implementation. Cheap to clone; state is shared.
#[derive(Clone)]
pub struct GuestDaemonService {
    inner: Arc<Inner>,
    /// The push key of the tunnel this copy serves (see [`Self::for_tunnel`]).
    push_key: Option<tunnel::PushKey>,
}

struct Inner {
    store: Arc<StateStore>,
    key: TeeKeyPair,
    hook: Option<PostApplyHook>,
    started: Instant,
    open_tunnels: Arc<AtomicU32>,
    credentials: watch::Sender<CredentialVersions>,
    locks: Arc<KeyedLocks>,
}

impl std::fmt::Debug for GuestDaemonService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDaemonService")
            .field("state", &self.inner.store.root())
            .field(
                "hook",
                &self.inner.hook.as_ref().map(PostApplyHook::command),
            )
            .finish_non_exhaustive()
    }
}

impl GuestDaemonService {
    /// A service storing into `store`, opening JWEs with `key`, running `hook`
    /// (if any) after each newly applied resource version.
    pub fn new(store: Arc<StateStore>, key: TeeKeyPair, hook: Option<PostApplyHook>) -> Self {
        let (credentials, _) = watch::channel(store.bundle_versions());
        Self {
            inner: Arc::new(Inner {
                store,
                key,
                hook,
                started: Instant::now(),
                open_tunnels: Arc::new(AtomicU32::new(0)),
                credentials,
                locks: Arc::default(),
            }),
            push_key: None,
        }
    }

    /// This service for one tunnel: pushes sealed to that tunnel's push key (`tether.v2`)
    /// open with it; everything else with the TEE key.
    pub fn for_tunnel(&self, push_key: Option<tunnel::PushKey>) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            push_key,
        }
    }

    /// The state store.
    pub fn store(&self) -> &Arc<StateStore> {
        &self.inner.store
    }

    /// The open-tunnel counter `probe(Runtime)` reports; the run loop updates it.
    pub fn open_tunnels(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.inner.open_tunnels)
    }

    /// Changes to the held credential bundles (the value is id -> version), for
    /// hot reload; it changes only when a new bundle version is committed.
    pub fn subscribe_credentials(&self) -> watch::Receiver<CredentialVersions> {
        self.inner.credentials.subscribe()
    }

    /// `apply_resource` without the RPC context.
    pub async fn apply(&self, resource: SealedResource) -> Result<Applied, GuestError> {
        let SealedResource {
            uri,
            version,
            jwe,
            sha256,
        } = resource;
        let result = self.apply_checked(&uri, version, jwe, &sha256).await;
        match &result {
            Ok(applied) => tracing::info!(
                uri = %applied.uri,
                version,
                outcome = if applied.already_held { "already_held" } else { "applied" },
                hook_status = applied.hook_status,
                "apply_resource"
            ),
            Err(e) => tracing::warn!(uri = ?uri, version, error = %e, "apply_resource refused"),
        }
        result
    }

    async fn apply_checked(
        &self,
        uri: &str,
        version: u64,
        jwe: Vec<u8>,
        announced: &str,
    ) -> Result<Applied, GuestError> {
        let path: ResourcePath = uri
            .parse()
            .map_err(|e| GuestError::Invalid(format!("resource uri: {e}")))?;
        check_version(version)?;
        let announced = parse_sha256(announced)?;
        let binding = ResourceBinding {
            sha256: announced.clone(),
            uri: uri.to_owned(),
            version,
        };
        let plaintext = self.unseal(jwe, RESOURCE_BINDING_HEADER, &binding).await?;
        let actual = hex::encode(Sha256::digest(&plaintext[..]));
        if actual != announced {
            return Err(GuestError::DigestMismatch { announced, actual });
        }

        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let uri = path.to_string();
            let _guard = KeyedLocks::lock(&inner.locks, &uri).await;
            let store = Arc::clone(&inner.store);
            let target = path.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                store.apply_resource(&target, version, &plaintext)
            })
            .await
            .map_err(|e| GuestError::Storage(format!("store task failed: {e}")))?
            .map_err(guest_error)?;
            let hook_status = match &inner.hook {
                Some(hook) if !outcome.already_held => {
                    let file = inner.store.resource_file(&path);
                    Some(hook.run(&uri, outcome.version, &file).await)
                }
                _ => None,
            };
            Ok(Applied {
                uri,
                version: outcome.version,
                sha256: outcome.sha256,
                already_held: outcome.already_held,
                hook_status,
            })
        });
        task.await
            .map_err(|e| GuestError::Storage(format!("apply task failed: {e}")))?
    }

    /// `install_credentials` without the RPC context.
    pub async fn install(&self, bundle: CredentialBundle) -> Result<Installed, GuestError> {
        let (id, version) = (bundle.id.clone(), bundle.version);
        let result = self.install_checked(bundle).await;
        match &result {
            Ok(installed) => tracing::info!(
                id,
                version,
                outcome = if installed.already_held {
                    "already_held"
                } else {
                    "installed"
                },
                "install_credentials"
            ),
            Err(e) => tracing::warn!(id = ?id, version, error = %e, "install_credentials refused"),
        }
        result
    }

    async fn install_checked(&self, bundle: CredentialBundle) -> Result<Installed, GuestError> {
        let CredentialBundle {
            id,
            version,
            files: listed,
            jwe,
            not_after,
        } = bundle;
        store::check_name("bundle id", &id).map_err(guest_error)?;
        check_version(version)?;
        let mut names = BTreeSet::new();
        for file in &listed {
            store::check_name("credential file name", &file.name).map_err(guest_error)?;
            store::check_mode(&file.name, file.mode).map_err(guest_error)?;
            if !names.insert(file.name.as_str()) {
                return Err(GuestError::Invalid(format!(
                    "file {:?} is listed twice",
                    file.name
                )));
            }
        }
        if not_after <= unix_now() {
            tracing::warn!(
                id,
                version,
                not_after,
                "installing credentials that have expired"
            );
        }

        let binding = BundleBinding::new(&id, version, &listed, not_after);
        let plaintext = self.unseal(jwe, BUNDLE_BINDING_HEADER, &binding).await?;
        let mut sealed: BTreeMap<String, ByteBuf> =
            ciborium::from_reader(&plaintext[..]).map_err(|e| {
                GuestError::Invalid(format!(
                    "bundle plaintext is not a CBOR map of file name -> bytes: {e}"
                ))
            })?;
        drop(plaintext);
        if let Some(extra) = sealed.keys().find(|name| !names.contains(name.as_str())) {
            return Err(GuestError::Invalid(format!(
                "sealed bundle holds file {extra:?} that is not listed"
            )));
        }
        let mut files = Vec::with_capacity(listed.len());
        for file in listed {
            let contents = sealed.remove(&file.name).ok_or_else(|| {
                GuestError::Invalid(format!(
                    "bundle lists file {:?} that the sealed map lacks",
                    file.name
                ))
            })?;
            files.push(BundleFile {
                name: file.name,
                mode: file.mode,
                contents: Zeroizing::new(contents.into_vec()),
            });
        }
        if id == crate::splitapi::BUNDLE_ID {
            // Refuse (and tell the KBS) rather than store credentials the endpoint cannot use.
            crate::splitapi::tls::server_config(&files)
                .map_err(|e| GuestError::Invalid(format!("splitapi bundle: {e}")))?;
        }

        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let _guard =
                KeyedLocks::lock(&inner.locks, &format!("{CREDENTIALS_URI_PREFIX}{id}")).await;
            let store = Arc::clone(&inner.store);
            let bundle_id = id.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                store.install_bundle(&bundle_id, version, files, not_after)
            })
            .await
            .map_err(|e| GuestError::Storage(format!("store task failed: {e}")))?
            .map_err(guest_error)?;
            if !outcome.already_held {
                inner
                    .credentials
                    .send_replace(inner.store.bundle_versions());
            }
            Ok(Installed {
                id,
                version: outcome.version,
                already_held: outcome.already_held,
            })
        });
        task.await
            .map_err(|e| GuestError::Storage(format!("install task failed: {e}")))?
    }

    /// `probe` without the RPC context.
    pub async fn report(&self, kind: ProbeKind) -> Result<ProbeReport, GuestError> {
        let mut report = ProbeReport::default();
        if matches!(kind, ProbeKind::Health | ProbeKind::All) {
            let problems = self.blocking(StateStore::check_writable).await?;
            report.health = Some(HealthReport {
                healthy: problems.is_empty(),
                problems,
            });
        }
        if matches!(kind, ProbeKind::Resources | ProbeKind::All) {
            let held: Vec<HeldResource> = self.blocking(StateStore::held).await?;
            report.resources = Some(held);
        }
        if matches!(kind, ProbeKind::Runtime | ProbeKind::All) {
            report.runtime = Some(RuntimeReport {
                uptime_s: self.inner.started.elapsed().as_secs(),
                rss_bytes: rss_bytes().unwrap_or(0),
                daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                open_tunnels: self.inner.open_tunnels.load(Ordering::Relaxed),
            });
        }
        Ok(report)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateStore) -> T + Send + 'static,
    ) -> Result<T, GuestError> {
        let store = Arc::clone(&self.inner.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| GuestError::Storage(format!("store task failed: {e}")))
    }

    /// Open a JWE sealed to the TEE key or to this tunnel's push key (off the async threads:
    /// RSA is slow), then check that its protected header member `header` binds exactly
    /// `expected`, the metadata that travelled beside it: a ciphertext replayed as another
    /// version, under another path, with other modes or expiry, is `Invalid`.
    async fn unseal(
        &self,
        jwe: Vec<u8>,
        header: &'static str,
        expected: &impl serde::Serialize,
    ) -> Result<Zeroizing<Vec<u8>>, GuestError> {
        let expected = serde_json::to_value(expected)
            .map_err(|e| GuestError::Invalid(format!("push metadata: {e}")))?;
        let inner = Arc::clone(&self.inner);
        let push_key = self.push_key.clone();
        let (plaintext, response) = tokio::task::spawn_blocking(move || {
            inner
                .key
                .open_json_parsed(&jwe, push_key.as_ref().map(tunnel::PushKey::bytes))
        })
        .await
        .map_err(|e| GuestError::Unseal(format!("unseal task failed: {e}")))?
        .map_err(|e| GuestError::Unseal(e.to_string()))?;
        // Opened: the protected header is authenticated, its binding is the KBS's.
        check_binding(
            header,
            response.protected.other_fields.get(header),
            &expected,
        )?;
        Ok(plaintext)
    }
}

impl GuestService for GuestDaemonService {
    async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
        payload
    }

    async fn install_credentials(
        self,
        _: Context,
        bundle: CredentialBundle,
    ) -> Result<Installed, GuestError> {
        self.install(bundle).await
    }

    async fn apply_resource(
        self,
        _: Context,
        resource: SealedResource,
    ) -> Result<Applied, GuestError> {
        self.apply(resource).await
    }

    async fn probe(self, _: Context, kind: ProbeKind) -> Result<ProbeReport, GuestError> {
        self.report(kind).await
    }
}

/// Map a store error onto the RPC error the KBS sees.
fn guest_error(e: StoreError) -> GuestError {
    match e {
        StoreError::Downgrade { held, offered, .. } => GuestError::Downgrade { held, offered },
        StoreError::VersionConflict { .. }
        | StoreError::InvalidName { .. }
        | StoreError::InvalidBundle(_) => GuestError::Invalid(e.to_string()),
        StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Key { .. } => {
            GuestError::Storage(e.to_string())
        }
    }
}

/// `bound` (the JWE's protected header member `header`) against `expected`, naming the
/// first field that differs.
fn check_binding(
    header: &str,
    bound: Option<&serde_json::Value>,
    expected: &serde_json::Value,
) -> Result<(), GuestError> {
    let Some(bound) = bound else {
        return Err(GuestError::Invalid(format!(
            "the JWE's protected header has no `{header}`: the metadata sent beside it is not \
             authenticated (a KBS that binds it is required)"
        )));
    };
    let (Some(bound), Some(expected)) = (bound.as_object(), expected.as_object()) else {
        return Err(GuestError::Invalid(format!("`{header}` is not an object")));
    };
    for (field, want) in expected {
        if bound.get(field) != Some(want) {
            return Err(GuestError::Invalid(format!(
                "{field} sent beside the JWE ({want}) is not what the JWE binds ({})",
                bound.get(field).unwrap_or(&serde_json::Value::Null)
            )));
        }
    }
    if let Some(extra) = bound.keys().find(|k| !expected.contains_key(*k)) {
        return Err(GuestError::Invalid(format!(
            "`{header}` binds an unknown field {extra:?}"
        )));
    }
    Ok(())
}

fn check_version(version: u64) -> Result<(), GuestError> {
    if version == 0 {
        return Err(GuestError::Invalid("versions start at 1".into()));
    }
    Ok(())
}

/// The announced digest, lower-cased; it must be 64 hex digits.
fn parse_sha256(announced: &str) -> Result<String, GuestError> {
    if announced.len() != 64 || !announced.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(GuestError::Invalid(
            "sha256 must be 64 hex digits".to_owned(),
        ));
    }
    Ok(announced.to_ascii_lowercase())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resident set size from `/proc/self/status` (`VmRSS`, in kB there; this
/// avoids needing the page size that `/proc/self/statm` counts in).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One async mutex per key (resource URI or `credentials/<id>`), dropped from
/// the map when nobody holds or waits for it, so the map stays as small as
/// the set of keys in use.
#[derive(Default)]
struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyedGuard {
    locks: Arc<KeyedLocks>,
    key: String,
    mutex: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(locks: &Arc<Self>, key: &str) -> KeyedGuard {
        let mutex = {
            let mut map = locks.map.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        let guard = Arc::clone(&mutex).lock_owned().await;
        KeyedGuard {
            locks: Arc::clone(locks),
            key: key.to_owned(),
            mutex,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        self.guard = None;
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under the map lock: two references (the map's
        // and ours) mean nobody else holds or waits for this key.
        if Arc::strong_count(&self.mutex) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests;
