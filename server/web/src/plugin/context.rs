//! [`PluginContext`]: what a plugin may use, as capabilities. Its fields are private, so a
//! plugin reaches storage only through its own namespace ([`PluginKv`]), the policy only as
//! itself (`data.plugin` is its name), and nothing of the KBS's configuration or of another
//! plugin. Anything else a plugin needs comes in through its constructor, from the
//! composition root's plugin list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::FromRef;
use kbs_core::attest::RcarService;
use kbs_core::audit::{Actor, Audit, AuditRecord};
use kbs_core::claims::Claims;
use kbs_core::guest_directory::{GuestAttestation, GuestDirectory};
use kbs_core::notices::{NoticeActor, ResourceNotice, ResourceNotices};
use kbs_core::policy::PolicyError;
use kbs_core::policy_gate::{Decision, PolicyGate, PolicyQuestion};
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::{KvStore, StoreError};
use tokio_util::sync::CancellationToken;

use crate::admin_auth::AdminIdentity;
use crate::admin_gate::AdminGate;
use crate::error::{ApiError, require};

/// The KBS services every plugin context is cut from (the composition root builds one).
#[derive(Clone)]
pub struct PluginServices {
    /// Plugins' key-value namespaces.
    pub kv: Arc<dyn KvStore>,
    /// Live guest tunnels.
    pub hub: tunnel::Hub,
    /// Attested facts of guests with tunnels.
    pub directory: Arc<GuestDirectory>,
    /// The resource policy.
    pub policy: PolicyGate,
    /// The audit trail.
    pub audit: Audit,
    /// Notices about resources (a delete), from one plugin to whoever subscribes.
    pub resource_notices: ResourceNotices,
    /// Admin authentication (for the [`crate::extract::AdminCaller`] extractor).
    pub admin: Arc<AdminGate>,
    /// Attestation sessions and tokens (for the [`crate::extract::Attested`] extractor).
    pub rcar: Arc<RcarService>,
    /// Cancelled when the KBS begins to shut down.
    pub shutdown: CancellationToken,
}

/// A plugin's view of the KBS. Cheap to clone.
#[derive(Clone)]
pub struct PluginContext {
    name: &'static str,
    enabled: Arc<AtomicBool>,
    services: PluginServices,
}

impl std::fmt::Debug for PluginContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginContext")
            .field("plugin", &self.name)
            .finish_non_exhaustive()
    }
}

impl PluginContext {
    /// The context of plugin `name`, whose enabled flag is `enabled`.
    pub fn new(name: &'static str, enabled: Arc<AtomicBool>, services: PluginServices) -> Self {
        Self {
            name,
            enabled,
            services,
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the plugin is enabled right now.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Cancelled when the KBS begins to shut down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.services.shutdown
    }

    /// The plugin's own key-value namespace (encrypted at rest; no way to name another).
    pub fn kv(&self) -> PluginKv {
        PluginKv {
            namespace: self.name,
            store: self.services.kv.clone(),
        }
    }

    /// Live guest tunnels (server-request plugins call guests through it).
    pub fn hub(&self) -> &tunnel::Hub {
        &self.services.hub
    }

    /// The claims and TEE key of `guest_id`'s latest token (recorded when its tunnel
    /// opened or re-attested), with the identity they state.
    pub fn attested_guest(&self, guest_id: &str) -> Option<Arc<GuestAttestation>> {
        self.services.directory.get(guest_id)
    }

    /// The guest directory itself (read it; the tunnel endpoint writes it).
    pub fn guest_directory(&self) -> &Arc<GuestDirectory> {
        &self.services.directory
    }

    /// The resource policy's decision for this plugin (`data.plugin` is its name).
    pub fn decide(
        &self,
        claims: &Claims,
        path: Option<&ResourcePath>,
        query: &BTreeMap<String, String>,
    ) -> Result<Decision, PolicyError> {
        self.services.policy.decide(
            claims,
            PolicyQuestion {
                plugin: self.name,
                path,
                query,
            },
        )
    }

    /// The resource policy's decision for a request to this plugin whose path (after
    /// `/kbs/v0/<name>/`) is `segments`. A plugin named `<family>/<member>` asks as
    /// `<family>` with `<member>` as the first segment: `external/echo` serving
    /// `/kbs/v0/external/echo/a/b` asks `data.plugin == "external"` and
    /// `data["resource-path"] == ["echo", "a", "b"]`, as upstream's external plugin does.
    pub fn decide_path(
        &self,
        claims: &Claims,
        segments: &[String],
        query: &BTreeMap<String, String>,
    ) -> Result<Decision, PolicyError> {
        match self.name.split_once('/') {
            Some((family, member)) => {
                let mut path = Vec::with_capacity(segments.len() + 1);
                path.push(member.to_string());
                path.extend_from_slice(segments);
                self.services
                    .policy
                    .decide_segments(claims, family, &path, query)
            }
            None => self
                .services
                .policy
                .decide_segments(claims, self.name, segments, query),
        }
    }

    /// [`decide`](Self::decide) as an HTTP outcome: 403 `PolicyDeny` when refused.
    pub fn require_policy(
        &self,
        claims: &Claims,
        path: Option<&ResourcePath>,
        query: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        require(self.decide(claims, path, query)?)
    }

    /// [`decide_path`](Self::decide_path) as an HTTP outcome: 403 `PolicyDeny` when refused.
    pub fn require_policy_path(
        &self,
        claims: &Claims,
        segments: &[String],
        query: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        require(self.decide_path(claims, segments, query)?)
    }

    /// Write an audit record for an admin action (`action` is `<plugin>.<verb>`).
    pub async fn audit(
        &self,
        admin: &AdminIdentity,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        admin
            .audit(&self.services.audit, action, target, outcome, detail)
            .await;
    }

    /// Announce that `admin` erased every version of `path` (the resource plugin does).
    pub fn notify_resource_deleted(&self, path: &ResourcePath, admin: &AdminIdentity) -> usize {
        self.services
            .resource_notices
            .publish(ResourceNotice::Deleted {
                path: path.to_string(),
                by: NoticeActor {
                    name: admin.actor(),
                    role: admin.role.clone(),
                },
            })
    }

    /// Resource notices published from now on.
    pub fn resource_notices(&self) -> tokio::sync::broadcast::Receiver<ResourceNotice> {
        self.services.resource_notices.subscribe()
    }

    /// Write an audit record for what this plugin did because of an admin's action (`by`,
    /// from a notice), under that admin's name.
    pub async fn audit_for(
        &self,
        by: &NoticeActor,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        self.services
            .audit
            .record(
                Actor {
                    name: &by.name,
                    role: &by.role,
                },
                AuditRecord {
                    action,
                    target,
                    outcome,
                    detail,
                },
            )
            .await;
    }

    /// Count an admin-side outcome that is not an audited action.
    pub(crate) fn count(&self, action: &str, outcome: &str) {
        self.services.admin.count(action, outcome);
    }
}

impl FromRef<PluginContext> for Arc<AdminGate> {
    fn from_ref(ctx: &PluginContext) -> Self {
        ctx.services.admin.clone()
    }
}

impl FromRef<PluginContext> for Arc<RcarService> {
    fn from_ref(ctx: &PluginContext) -> Self {
        ctx.services.rcar.clone()
    }
}

/// A plugin's storage namespace in the core key-value table (values sealed with the KEK).
#[derive(Clone)]
pub struct PluginKv {
    namespace: &'static str,
    store: Arc<dyn KvStore>,
}

impl PluginKv {
    /// Read a key.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.kv_get(self.namespace, key).await
    }

    /// Write a key.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store.kv_put(self.namespace, key, value).await
    }

    /// Delete a key; false if absent.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.store.kv_delete(self.namespace, key).await
    }

    /// Keys with `prefix`, sorted, at most `limit`.
    pub async fn list(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.kv_list(self.namespace, prefix, limit).await
    }
}
