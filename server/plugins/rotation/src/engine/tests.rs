//! The reconciler against its narrow dependencies only: an in-memory store (no database
//! file), in-process tunnels (no socket, no HTTP) answered by recording guests.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_core::fleet::Fleet;
use kbs_core::guest_directory::GuestDirectory;
use kbs_core::identity::GuestIdentity;
use kbs_core::policy::PolicyEngine;
use kbs_core::policy_gate::PolicyGate;
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::{
    Change, ChangeFeed, KeyEncryptionKey, NewRollout, ResourceStore, RolloutState, RolloutStore,
    SqliteStore, TargetRecord, TargetState,
};
use kbs_core::token::{TokenSigner, build_claims};
use rpc_defs::{
    Applied, CredentialBundle, GuestError, GuestService, Installed, ProbeKind, ProbeReport,
    SealedResource,
};
use serde_bytes::ByteBuf;
use serde_json::json;
use tarpc::context::Context;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::{JoinHandle, LocalSet};
use tokio_util::sync::CancellationToken;
use tunnel::in_process::{self, InProcessConfig};
use tunnel::{PushKey, TunnelHandle, TunnelInfo};

use super::{Command, Control, ControlError, RolloutEvent, run};
use crate::{Deps, RotationMetrics};

const PATH: &str = "default/key/a";
const ALLOW_ALL: &str = "package policy\nimport rego.v1\ndefault allow := true\n";
/// Refuses guests labelled `tier=denied`.
const DENY_TIER: &str = "package policy\nimport rego.v1\ndefault allow := false\n\
    allow if { input.tether.labels.tier != \"denied\" }\n";
const WAIT: Duration = Duration::from_secs(10);

/// What a recording guest does with a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Applies it.
    Ack,
    /// Fails it as a storage error (retried).
    Storage,
    /// Refuses it as invalid (not retried).
    Invalid,
    /// Waits for `release` before applying.
    Hold,
    /// Acknowledges another resource than the one pushed.
    OtherUri,
    /// Acknowledges the version pushed with another digest.
    OtherDigest,
    /// Answers that it holds a newer version (with that version's digest).
    Newer,
}

/// A guest that records every push it receives and answers as told.
#[derive(Clone)]
struct RecordingGuest {
    behaviour: Arc<Mutex<Behaviour>>,
    pushes: Arc<Mutex<Vec<SealedResource>>>,
    held: Arc<Mutex<Option<u64>>>,
    release: Arc<Notify>,
}

impl RecordingGuest {
    fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour: Arc::new(Mutex::new(behaviour)),
            pushes: Arc::default(),
            held: Arc::default(),
            release: Arc::new(Notify::new()),
        }
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn pushes(&self) -> Vec<SealedResource> {
        self.pushes.lock().unwrap().clone()
    }
}

impl GuestService for RecordingGuest {
    async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
        payload
    }

    async fn install_credentials(
        self,
        _: Context,
        _: CredentialBundle,
    ) -> Result<Installed, GuestError> {
        Err(GuestError::Unsupported("install_credentials".into()))
    }

    async fn apply_resource(
        self,
        _: Context,
        resource: SealedResource,
    ) -> Result<Applied, GuestError> {
        self.pushes.lock().unwrap().push(resource.clone());
        let behaviour = *self.behaviour.lock().unwrap();
        match behaviour {
            Behaviour::Storage => return Err(GuestError::Storage("disk full".into())),
            Behaviour::Invalid => return Err(GuestError::Invalid("not for me".into())),
            Behaviour::Hold => self.release.notified().await,
            Behaviour::Ack => {}
            Behaviour::OtherUri => {
                return Ok(Applied {
                    uri: "default/key/other".into(),
                    version: resource.version,
                    sha256: resource.sha256,
                    already_held: false,
                    hook_status: Some(0),
                });
            }
            Behaviour::OtherDigest | Behaviour::Newer => {
                let newer = behaviour == Behaviour::Newer;
                return Ok(Applied {
                    uri: resource.uri,
                    version: resource.version + u64::from(newer),
                    sha256: "0".repeat(64),
                    already_held: newer,
                    hook_status: None,
                });
            }
        }
        let already_held = {
            let mut held = self.held.lock().unwrap();
            let already = *held == Some(resource.version);
            *held = Some(resource.version);
            already
        };
        Ok(Applied {
            uri: resource.uri,
            version: resource.version,
            sha256: resource.sha256,
            already_held,
            hook_status: Some(0),
        })
    }

    async fn probe(self, _: Context, _: ProbeKind) -> Result<ProbeReport, GuestError> {
        Err(GuestError::Unsupported("probe".into()))
    }
}

/// One reconciler over an in-memory store, and the guests it can reach.
struct Rig {
    deps: Deps,
    store: Arc<SqliteStore>,
    signer: TokenSigner,
    guests: HashMap<String, (Arc<TunnelHandle>, JoinHandle<()>)>,
    engine: Option<Engine>,
    events: broadcast::Sender<Arc<RolloutEvent>>,
    sha256: String,
}

struct Engine {
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn tee_key() -> kbs_types::TeePubKey {
    kbs_types::TeePubKey::EC {
        crv: "P-256".into(),
        alg: "ECDH-ES+A256KW".into(),
        x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
        y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
    }
}

impl Rig {
    async fn new(policy: &str) -> Self {
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[3u8; 32]));
        let store = Arc::new(SqliteStore::open_in_memory(kek).await.unwrap());
        let path: ResourcePath = PATH.parse().unwrap();
        store
            .put_resource(&path, b"secret v1", "ops")
            .await
            .unwrap();
        let sha256 = store
            .get_resource(&path, Some(1))
            .await
            .unwrap()
            .unwrap()
            .sha256;
        let deps = Deps {
            rollouts: store.clone(),
            resources: store.clone(),
            fleet: Arc::new(Fleet::new()),
            policy: PolicyGate::new(
                Arc::new(PolicyEngine::new(policy).unwrap()),
                Default::default(),
            ),
            hub: tunnel::Hub::new(),
            directory: Arc::new(GuestDirectory::new()),
            metrics: RotationMetrics::default(),
            changes: ChangeFeed::default(),
            shared: false,
        };
        Self {
            deps,
            store,
            signer: TokenSigner::ephemeral().unwrap(),
            guests: HashMap::new(),
            engine: None,
            events: broadcast::channel(4096).0,
            sha256,
        }
    }

    fn start(&mut self) {
        let (commands, mut rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let (deps, events, token) = (self.deps.clone(), self.events.clone(), stop.clone());
        let task = tokio::task::spawn_local(async move {
            run(deps, events, &mut rx, token).await;
        });
        self.engine = Some(Engine {
            commands,
            stop,
            task,
        });
    }

    /// Stops the reconciler as a crash would: no drain, pushes in flight abandoned.
    async fn crash(&mut self) {
        let engine = self.engine.take().unwrap();
        engine.task.abort();
        let _ = engine.task.await;
    }

    async fn stop(&mut self) {
        let engine = self.engine.take().unwrap();
        engine.stop.cancel();
        engine.task.await.unwrap();
    }

    async fn send(&self, cmd: Command) {
        self.engine
            .as_ref()
            .unwrap()
            .commands
            .send(cmd)
            .await
            .unwrap();
    }

    /// `guest_id` connects with `labels`, answered by `guest` (with a push key: `tether.v2`).
    async fn connect(
        &mut self,
        guest_id: &str,
        labels: &[(&str, &str)],
        guest: &RecordingGuest,
        push_key: Option<PushKey>,
    ) -> Arc<TunnelHandle> {
        let config = InProcessConfig {
            push_key,
            ..InProcessConfig::default()
        };
        self.connect_with(guest_id, labels, guest, config).await
    }

    /// [`Rig::connect`] over a tunnel configured as `config` says.
    async fn connect_with(
        &mut self,
        guest_id: &str,
        labels: &[(&str, &str)],
        guest: &RecordingGuest,
        config: InProcessConfig,
    ) -> Arc<TunnelHandle> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let labels = tunnel::labels::intern(Arc::new(labels));
        let identity = GuestIdentity {
            guest_id: guest_id.into(),
            labels: labels.clone(),
            ..Default::default()
        };
        let claims = build_claims("sample", json!({}), &tee_key(), "bm9uY2U=", None, &identity);
        let (_, token) = self
            .signer
            .issue_verified(claims, Duration::from_secs(300))
            .unwrap();
        self.deps.directory.record_proven(&token, 0);
        let info = TunnelInfo {
            guest_id: guest_id.into(),
            labels,
            ..Default::default()
        };
        let (handle, serving) = in_process::connect(info, config, guest.clone());
        let task = tokio::task::spawn_local(serving);
        self.deps.hub.register(handle.clone());
        self.guests
            .insert(guest_id.to_string(), (handle.clone(), task));
        if self.engine.is_some() {
            self.send(Command::Connected(handle.clone())).await;
        }
        handle
    }

    /// The guest's tunnel goes away.
    async fn disconnect(&mut self, guest_id: &str) {
        let (handle, task) = self.guests.remove(guest_id).unwrap();
        task.abort();
        let _ = task.await;
        self.deps.hub.unregister(guest_id, handle.epoch, 1006);
    }

    async fn create(&self, selector: &str, targets: &[&str], max_concurrent: u32) -> i64 {
        let new = NewRollout {
            path: PATH.into(),
            version: 1,
            sha256: self.sha256.clone(),
            selector: selector.into(),
            max_concurrent,
            max_attempts: 2,
            guest_deadline_ms: 5_000,
            deadline_at: None,
            created_by: "ops@test".into(),
        };
        let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        let created = self.store.create_rollout(&new, &targets).await.unwrap();
        let id = created.rollout.id;
        if self.engine.is_some() {
            self.send(Command::Created {
                id,
                superseded: created.superseded,
            })
            .await;
        }
        id
    }

    async fn control(&self, id: i64, action: Control) -> Result<RolloutState, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Control {
            id,
            action,
            actor: "ops@test".into(),
            reply,
        })
        .await;
        answer.await.unwrap().map(|rec| rec.state)
    }

    async fn targets(&self, id: i64) -> BTreeMap<String, TargetRecord> {
        self.store
            .list_targets(id, None, None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.guest_id.clone(), t))
            .collect()
    }

    async fn state(&self, id: i64) -> RolloutState {
        self.store.get_rollout(id).await.unwrap().unwrap().state
    }

    /// Waits until the stored targets satisfy `cond`; fails naming `what` after [`WAIT`].
    async fn until_targets(
        &self,
        id: i64,
        what: &str,
        cond: impl Fn(&BTreeMap<String, TargetRecord>) -> bool,
    ) -> BTreeMap<String, TargetRecord> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let targets = self.targets(id).await;
            if cond(&targets) {
                return targets;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reached: {what}; targets now {targets:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until_state(&self, id: i64, want: RolloutState) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.state(id).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rollout {id} never became {want}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn state_of(targets: &BTreeMap<String, TargetRecord>, guest: &str) -> Option<TargetState> {
    targets.get(guest).map(|t| t.state)
}

/// Runs `test` on a local set (in-process guests run their calls on it).
fn local<F: std::future::Future<Output = ()>>(test: F) -> impl std::future::Future<Output = ()> {
    let set = LocalSet::new();
    async move { set.run_until(test).await }
}

#[tokio::test]
async fn selected_guests_are_acked_offline_ones_when_they_come_and_newcomers_are_adopted() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let (db1, db2, web) = (
            RecordingGuest::new(Behaviour::Ack),
            RecordingGuest::new(Behaviour::Ack),
            RecordingGuest::new(Behaviour::Ack),
        );
        rig.connect("db1", &[("app", "db")], &db1, None).await;
        rig.connect("db2", &[("app", "db")], &db2, None).await;
        rig.connect("web1", &[("app", "web")], &web, None).await;
        rig.start();
        let id = rig.create("app=db", &["db1", "db2", "db3"], 8).await;
        let t = rig
            .until_targets(id, "the connected db guests acked", |t| {
                state_of(t, "db1") == Some(TargetState::Acked)
                    && state_of(t, "db2") == Some(TargetState::Acked)
            })
            .await;
        assert_eq!(state_of(&t, "db3"), Some(TargetState::Pending), "offline");
        assert_eq!(state_of(&t, "web1"), None, "not selected");
        assert!(web.pushes().is_empty());
        assert_eq!(rig.state(id).await, RolloutState::Running);
        let ack = &t["db1"];
        assert_eq!(
            (
                ack.attempts,
                ack.held_version,
                ack.hook_status,
                ack.already_held
            ),
            (1, Some(1), Some(0), false)
        );
        assert_eq!(ack.digest.as_deref(), Some(rig.sha256.as_str()));
        // The push named the version and its digest, sealed to the TEE key (tether.v1).
        let push = &db1.pushes()[0];
        assert_eq!((push.uri.as_str(), push.version), (PATH, 1));
        assert_eq!(push.sha256, rig.sha256);
        let protected = jwe_header(&push.jwe);
        assert_eq!(protected["alg"], "ECDH-ES+A256KW");

        // The offline target comes back, and a newcomer the selector picks is adopted.
        let db3 = RecordingGuest::new(Behaviour::Ack);
        let db4 = RecordingGuest::new(Behaviour::Ack);
        rig.connect("db3", &[("app", "db")], &db3, None).await;
        rig.connect("db4", &[("app", "db")], &db4, None).await;
        rig.until_targets(id, "db3 and the newcomer db4 acked", |t| {
            state_of(t, "db3") == Some(TargetState::Acked)
                && state_of(t, "db4") == Some(TargetState::Acked)
        })
        .await;
        rig.until_state(id, RolloutState::Completed).await;
        assert_eq!(db1.pushes().len(), 1, "an acked guest is not pushed again");
        rig.stop().await;
    })
    .await;
}

/// Opens a JWE `dir` + A256GCM (RFC 7516 5.2: the AAD is the encoded protected header),
/// written here from the RFC rather than with the KBS's or the guest's JWE code.
fn open_dir(key: &[u8; 32], jwe: &[u8]) -> Option<Vec<u8>> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let jwe: serde_json::Value = serde_json::from_slice(jwe).ok()?;
    let field = |name: &str| URL_SAFE_NO_PAD.decode(jwe[name].as_str()?).ok();
    let mut sealed = field("ciphertext")?;
    sealed.extend(field("tag")?);
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(key).ok()?;
    let payload = Payload {
        msg: &sealed,
        aad: jwe["protected"].as_str()?.as_bytes(),
    };
    cipher.decrypt(field("iv")?.as_slice().into(), payload).ok()
}

fn jwe_header(jwe: &[u8]) -> serde_json::Value {
    let jwe: serde_json::Value = serde_json::from_slice(jwe).unwrap();
    let protected = jwe["protected"].as_str().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(protected).unwrap()).unwrap()
}

#[tokio::test]
async fn a_tether_v2_tunnel_gets_its_push_sealed_under_its_push_key() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let guest = RecordingGuest::new(Behaviour::Ack);
        let key = PushKey::generate();
        rig.connect("g1", &[], &guest, Some(key.clone())).await;
        rig.start();
        let id = rig.create("", &["g1"], 1).await;
        rig.until_targets(id, "g1 acked", |t| {
            state_of(t, "g1") == Some(TargetState::Acked)
        })
        .await;
        let push = &guest.pushes()[0];
        let header = jwe_header(&push.jwe);
        assert_eq!(header["alg"], "dir");
        let jwe: serde_json::Value = serde_json::from_slice(&push.jwe).unwrap();
        assert_eq!(jwe["encrypted_key"], "");
        assert_eq!(open_dir(key.bytes(), &push.jwe).unwrap(), b"secret v1");
        assert!(open_dir(PushKey::generate().bytes(), &push.jwe).is_none());
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn failures_are_retried_then_given_up_and_refusals_are_final() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let flaky = RecordingGuest::new(Behaviour::Storage);
        let broken = RecordingGuest::new(Behaviour::Storage);
        let refusing = RecordingGuest::new(Behaviour::Invalid);
        rig.connect("flaky", &[], &flaky, None).await;
        rig.connect("broken", &[], &broken, None).await;
        rig.connect("refusing", &[], &refusing, None).await;
        rig.start();
        let id = rig.create("", &["flaky", "broken", "refusing"], 8).await;
        // The first attempt fails everywhere; the flaky guest recovers before the retry.
        rig.until_targets(id, "a first attempt each", |t| {
            t.len() == 3 && t.values().all(|t| t.attempts >= 1)
        })
        .await;
        flaky.set(Behaviour::Ack);
        let t = rig
            .until_targets(id, "every target settled", |t| {
                t.len() == 3
                    && t.values()
                        .all(|t| matches!(t.state, TargetState::Acked | TargetState::Failed))
            })
            .await;
        assert_eq!(state_of(&t, "flaky"), Some(TargetState::Acked));
        assert_eq!(t["flaky"].attempts, 2);
        assert_eq!(state_of(&t, "broken"), Some(TargetState::Failed));
        assert_eq!(t["broken"].attempts, 2, "max_attempts is 2");
        assert!(
            t["broken"].reason.contains("gave up"),
            "{}",
            t["broken"].reason
        );
        assert_eq!(state_of(&t, "refusing"), Some(TargetState::Failed));
        assert_eq!(refusing.pushes().len(), 1, "a refusal is not retried");
        rig.until_state(id, RolloutState::Completed).await;
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_policy_refuses_a_guest_and_nothing_is_sent_to_it() {
    local(async {
        let mut rig = Rig::new(DENY_TIER).await;
        let ok = RecordingGuest::new(Behaviour::Ack);
        let denied = RecordingGuest::new(Behaviour::Ack);
        rig.connect("ok", &[("tier", "gold")], &ok, None).await;
        rig.connect("no", &[("tier", "denied")], &denied, None)
            .await;
        rig.start();
        let id = rig.create("", &["ok", "no"], 8).await;
        let t = rig
            .until_targets(id, "both decided", |t| {
                state_of(t, "ok") == Some(TargetState::Acked)
                    && state_of(t, "no") == Some(TargetState::Denied)
            })
            .await;
        assert!(
            t["no"].reason.contains("policy denies"),
            "{}",
            t["no"].reason
        );
        assert!(denied.pushes().is_empty());
        rig.stop().await;
    })
    .await;
}

/// What the guest answers is checked against what was pushed: another resource, or the
/// version pushed with another digest, fails the target; a newer version held is an ack that
/// says so.
#[tokio::test]
async fn an_answer_that_does_not_match_the_push_fails_the_target_and_a_newer_version_is_noted() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let guests = [
            ("ok", Behaviour::Ack),
            ("other-uri", Behaviour::OtherUri),
            ("other-digest", Behaviour::OtherDigest),
            ("newer", Behaviour::Newer),
        ];
        let mut recording = Vec::new();
        for (id, behaviour) in guests {
            let guest = RecordingGuest::new(behaviour);
            rig.connect(id, &[], &guest, None).await;
            recording.push(guest);
        }
        rig.start();
        let id = rig
            .create("", &["ok", "other-uri", "other-digest", "newer"], 8)
            .await;
        let t = rig
            .until_targets(id, "every target settled", |t| {
                t.len() == 4
                    && t.values()
                        .all(|t| matches!(t.state, TargetState::Acked | TargetState::Failed))
            })
            .await;
        assert_eq!(state_of(&t, "ok"), Some(TargetState::Acked));
        assert_eq!(t["ok"].reason, "", "a plain ack has no reason");
        assert_eq!(state_of(&t, "other-uri"), Some(TargetState::Failed));
        assert!(
            t["other-uri"]
                .reason
                .contains("another resource: default/key/other"),
            "{}",
            t["other-uri"].reason
        );
        assert_eq!(state_of(&t, "other-digest"), Some(TargetState::Failed));
        assert!(
            t["other-digest"].reason.contains("reports digest 000"),
            "{}",
            t["other-digest"].reason
        );
        let newer = &t["newer"];
        assert_eq!(newer.state, TargetState::Acked);
        assert_eq!(newer.reason, "guest holds a newer version (2)");
        assert_eq!(
            (newer.held_version, newer.already_held, newer.hook_status),
            (Some(2), true, None)
        );
        assert_eq!(newer.digest.as_deref(), Some("0".repeat(64).as_str()));
        for guest in &recording {
            assert_eq!(guest.pushes().len(), 1, "none of these is retried");
        }
        rig.stop().await;
    })
    .await;
}

/// A guest whose tunnel has no call slot free is tried again shortly, the busy answer not
/// counted as an attempt.
#[tokio::test]
async fn a_busy_tunnel_is_tried_again_shortly_without_counting_an_attempt() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let guest = RecordingGuest::new(Behaviour::Hold);
        let config = InProcessConfig {
            max_in_flight: 1,
            ..InProcessConfig::default()
        };
        let handle = rig.connect_with("busy", &[], &guest, config).await;
        // Another call takes the tunnel's only slot and is held there.
        let other = SealedResource {
            uri: "default/key/other".into(),
            version: 9,
            jwe: Vec::new(),
            sha256: "0".repeat(64),
        };
        let held =
            tokio::task::spawn_local(async move { handle.apply_resource(other, None).await });
        while guest.pushes().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        guest.set(Behaviour::Ack);
        rig.start();
        let id = rig.create("", &["busy"], 1).await;
        let t = rig
            .until_targets(id, "the push found the tunnel busy", |t| {
                t.get("busy").is_some_and(|t| t.reason.contains("busy"))
            })
            .await;
        let busy = &t["busy"];
        assert_eq!((busy.state, busy.attempts), (TargetState::Pending, 0));
        assert!(
            busy.next_attempt_at > busy.updated_at,
            "tried again later, not at once: {busy:?}"
        );
        assert!(busy.next_attempt_at <= busy.updated_at + 100, "{busy:?}");
        guest.release.notify_one();
        held.await.unwrap().unwrap();
        let t = rig
            .until_targets(id, "busy acked once the slot was free", |t| {
                state_of(t, "busy") == Some(TargetState::Acked)
            })
            .await;
        assert_eq!(t["busy"].attempts, 1);
        rig.stop().await;
    })
    .await;
}

/// A policy that fails to evaluate for a guest is retried as any failure is, each evaluation
/// counted as an attempt, and nothing is sent.
#[tokio::test]
async fn a_policy_that_fails_to_evaluate_is_retried_then_given_up() {
    local(async {
        let policy = "package policy\nimport rego.v1\ndefault allow := true\n\
            allow := \"maybe\" if { input.tether.labels.tier == \"odd\" }\n";
        let mut rig = Rig::new(policy).await;
        let odd = RecordingGuest::new(Behaviour::Ack);
        rig.connect("odd", &[("tier", "odd")], &odd, None).await;
        rig.start();
        let id = rig.create("", &["odd"], 1).await;
        let t = rig
            .until_targets(id, "odd failed", |t| {
                state_of(t, "odd") == Some(TargetState::Failed)
            })
            .await;
        assert_eq!(t["odd"].attempts, 2, "max_attempts is 2");
        assert!(
            t["odd"].reason.starts_with("policy evaluation: ")
                && t["odd"].reason.contains("gave up after 2 attempts"),
            "{}",
            t["odd"].reason
        );
        assert!(odd.pushes().is_empty());
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn pause_holds_pushes_resume_continues_and_cancel_is_final() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let guests: Vec<RecordingGuest> = (0..3)
            .map(|_| RecordingGuest::new(Behaviour::Hold))
            .collect();
        for (i, g) in guests.iter().enumerate() {
            rig.connect(&format!("g{i}"), &[], g, None).await;
        }
        rig.start();
        let id = rig.create("", &["g0", "g1", "g2"], 1).await;
        // One push at a time: the first is held in the guest.
        let held = rig
            .until_targets(id, "one push in flight", |t| {
                t.values()
                    .filter(|t| t.state == TargetState::Delivering)
                    .count()
                    == 1
            })
            .await;
        let first = held
            .values()
            .find(|t| t.state == TargetState::Delivering)
            .unwrap()
            .guest_id
            .clone();
        assert_eq!(
            rig.control(id, Control::Pause).await.unwrap(),
            RolloutState::Paused
        );
        for g in &guests {
            g.set(Behaviour::Ack);
            g.release.notify_waiters();
        }
        rig.until_targets(id, "the push in flight acked", |t| {
            state_of(t, &first) == Some(TargetState::Acked)
        })
        .await;
        // Paused: nothing else starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = rig.targets(id).await;
        assert_eq!(
            t.values().filter(|t| t.state == TargetState::Acked).count(),
            1,
            "no push started while paused: {t:#?}"
        );
        assert_eq!(rig.state(id).await, RolloutState::Paused);
        assert_eq!(
            rig.control(id, Control::Resume).await.unwrap(),
            RolloutState::Running
        );
        rig.until_state(id, RolloutState::Completed).await;
        assert_eq!(
            rig.control(id, Control::Cancel).await.unwrap(),
            RolloutState::Cancelled
        );
        assert_eq!(rig.state(id).await, RolloutState::Cancelled);
        assert!(matches!(
            rig.control(id, Control::Resume).await,
            Err(ControlError::Finished(_, RolloutState::Cancelled))
        ));
        assert!(matches!(
            rig.control(9999, Control::Pause).await,
            Err(ControlError::NotFound(9999))
        ));
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_restart_resumes_pending_targets_and_keeps_acked_rows_unchanged() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let fast = RecordingGuest::new(Behaviour::Ack);
        let slow = RecordingGuest::new(Behaviour::Hold);
        rig.connect("fast", &[], &fast, None).await;
        rig.connect("slow", &[], &slow, None).await;
        rig.start();
        let id = rig.create("", &["fast", "slow", "later"], 8).await;
        let before = rig
            .until_targets(id, "fast acked while slow is in flight", |t| {
                state_of(t, "fast") == Some(TargetState::Acked) && slow.pushes().len() == 1
            })
            .await;
        // The reconciler dies with the slow push in flight (its delivery task finishes on its
        // own when the guest goes: the target is stored pending again).
        rig.crash().await;
        rig.disconnect("slow").await;
        slow.set(Behaviour::Ack);
        slow.release.notify_waiters();

        rig.start();
        let slow2 = slow.clone();
        rig.connect("slow", &[], &slow2, None).await;
        let later = RecordingGuest::new(Behaviour::Ack);
        rig.connect("later", &[], &later, None).await;
        let after = rig
            .until_targets(id, "every target acked after the restart", |t| {
                t.values().all(|t| t.state == TargetState::Acked)
            })
            .await;
        rig.until_state(id, RolloutState::Completed).await;
        // The ack written before the crash is exactly as it was: not re-queued, not re-sent.
        assert_eq!(after["fast"], before["fast"]);
        assert_eq!(fast.pushes().len(), 1);
        assert_eq!(after["fast"].attempts, 1);
        assert!(!after["fast"].already_held);
        assert_eq!(after["fast"].hook_status, Some(0));
        // The push lost in the crash was made again, once, and applied once.
        assert_eq!(slow.pushes().len(), 2);
        assert!(!after["slow"].already_held);
        assert_eq!(later.pushes().len(), 1);
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_passed_deadline_expires_the_rollout_and_fails_what_is_pending() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let new = NewRollout {
            path: PATH.into(),
            version: 1,
            sha256: rig.sha256.clone(),
            selector: String::new(),
            max_concurrent: 8,
            max_attempts: 2,
            guest_deadline_ms: 5_000,
            deadline_at: Some(kbs_core::storage::now_ms() + 300),
            created_by: "ops@test".into(),
        };
        let id = rig
            .store
            .create_rollout(&new, &["offline".to_string()])
            .await
            .unwrap()
            .rollout
            .id;
        rig.start();
        rig.until_state(id, RolloutState::Expired).await;
        let t = rig
            .until_targets(id, "the pending target failed", |t| {
                state_of(t, "offline") == Some(TargetState::Failed)
            })
            .await;
        assert!(
            t["offline"].reason.contains("deadline"),
            "{}",
            t["offline"].reason
        );
        rig.stop().await;
    })
    .await;
}

/// Issue 17, defect 8: a deleted resource's rollouts are cancelled (the command answers
/// which), their pending targets fail with the reason, and a guest that comes back later gets
/// nothing; a rollout of another path is untouched.
#[tokio::test]
async fn a_deleted_resource_cancels_its_rollouts_and_nothing_more_is_pushed() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let other: ResourcePath = "default/key/other".parse().unwrap();
        rig.store
            .put_resource(&other, b"other", "ops")
            .await
            .unwrap();
        let on = RecordingGuest::new(Behaviour::Ack);
        rig.connect("on", &[("app", "db")], &on, None).await;
        rig.start();
        let id = rig.create("app=db", &["on", "away"], 8).await;
        rig.until_targets(id, "on acked", |t| {
            state_of(t, "on") == Some(TargetState::Acked)
        })
        .await;
        let other_id = {
            let new = NewRollout {
                path: other.to_string(),
                version: 1,
                sha256: rig
                    .store
                    .get_resource(&other, Some(1))
                    .await
                    .unwrap()
                    .unwrap()
                    .sha256,
                selector: "app=db".into(),
                max_concurrent: 8,
                max_attempts: 2,
                guest_deadline_ms: 5_000,
                deadline_at: None,
                created_by: "ops@test".into(),
            };
            let created = rig
                .store
                .create_rollout(&new, &["away".to_string()])
                .await
                .unwrap();
            rig.send(Command::Created {
                id: created.rollout.id,
                superseded: vec![],
            })
            .await;
            created.rollout.id
        };

        let path: ResourcePath = PATH.parse().unwrap();
        assert!(rig.store.delete_resource(&path, "ops").await.unwrap());
        let (reply, answer) = oneshot::channel();
        rig.send(Command::ResourceDeleted {
            path: PATH.into(),
            detail: format!("resource {PATH} deleted by ops@test"),
            reply,
        })
        .await;
        assert_eq!(answer.await.unwrap(), vec![id], "only that path's rollout");
        assert_eq!(rig.state(id).await, RolloutState::Cancelled);
        let rec = rig.store.get_rollout(id).await.unwrap().unwrap();
        assert!(rec.detail.contains("deleted"), "{}", rec.detail);
        let t = rig
            .until_targets(id, "away failed", |t| {
                state_of(t, "away") == Some(TargetState::Failed)
            })
            .await;
        assert!(t["away"].reason.contains("deleted"), "{:?}", t["away"]);
        assert_ne!(rig.state(other_id).await, RolloutState::Cancelled);

        let away = RecordingGuest::new(Behaviour::Ack);
        rig.connect("away", &[("app", "db")], &away, None).await;
        rig.until_targets(other_id, "the other path's version reaches away", |t| {
            state_of(t, "away") == Some(TargetState::Acked)
        })
        .await;
        let pushed: Vec<String> = away.pushes().iter().map(|p| p.uri.clone()).collect();
        assert_eq!(
            pushed,
            vec![other.to_string()],
            "nothing of the erased path"
        );
        rig.stop().await;
    })
    .await;
}

/// Issue 17, defect 8: even without the notice (it lagged, or the reconciler was not
/// running), an erased version is never pushed: each delivery checks it, with the plaintext
/// already loaded.
#[tokio::test]
async fn an_erased_version_is_never_delivered_even_when_the_notice_is_missed() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        let first = RecordingGuest::new(Behaviour::Ack);
        rig.connect("first", &[("app", "db")], &first, None).await;
        rig.start();
        let id = rig.create("app=db", &["first", "late"], 8).await;
        rig.until_targets(id, "first acked", |t| {
            state_of(t, "first") == Some(TargetState::Acked)
        })
        .await;
        let path: ResourcePath = PATH.parse().unwrap();
        assert!(rig.store.delete_resource(&path, "ops").await.unwrap());
        let late = RecordingGuest::new(Behaviour::Ack);
        rig.connect("late", &[("app", "db")], &late, None).await;
        let t = rig
            .until_targets(id, "late failed", |t| {
                state_of(t, "late") == Some(TargetState::Failed)
            })
            .await;
        assert!(t["late"].reason.contains("erased"), "{:?}", t["late"]);
        assert!(late.pushes().is_empty(), "an erased version was pushed");
        rig.stop().await;
    })
    .await;
}

/// Issue 17, defect 8: a rollout whose deadline passes expires; pending targets fail.
#[tokio::test]
async fn a_rollout_past_its_deadline_expires_and_its_pending_targets_fail() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        rig.start();
        let new = NewRollout {
            path: PATH.into(),
            version: 1,
            sha256: rig.sha256.clone(),
            selector: "app=db".into(),
            max_concurrent: 8,
            max_attempts: 2,
            guest_deadline_ms: 5_000,
            deadline_at: Some(kbs_core::storage::now_ms() + 300),
            created_by: "ops@test".into(),
        };
        let created = rig
            .store
            .create_rollout(&new, &["offline".to_string()])
            .await
            .unwrap();
        let id = created.rollout.id;
        rig.send(Command::Created {
            id,
            superseded: vec![],
        })
        .await;
        rig.until_state(id, RolloutState::Expired).await;
        let t = rig
            .until_targets(id, "offline failed", |t| {
                state_of(t, "offline") == Some(TargetState::Failed)
            })
            .await;
        assert!(
            t["offline"].reason.contains("deadline"),
            "{:?}",
            t["offline"]
        );
        rig.stop().await;
    })
    .await;
}

/// Issue 17: guest ids are per sandbox, so under churn every id is new. What the reconciler
/// remembers about guests must follow the live tunnels, not every id ever seen; a guest that
/// comes back after being forgotten still gets its pending push.
#[tokio::test]
async fn guest_churn_leaves_no_trace_in_the_reconciler_and_a_returning_target_is_served() {
    local(async {
        let mut rig = Rig::new(ALLOW_ALL).await;
        rig.start();
        let id = rig.create("app=none", &["returner"], 8).await;
        let guest = RecordingGuest::new(Behaviour::Ack);
        for i in 0..200 {
            let g = format!("sandbox-{i}");
            rig.connect(&g, &[("app", "churn")], &guest, None).await;
            rig.disconnect(&g).await;
        }
        let returner = RecordingGuest::new(Behaviour::Ack);
        rig.connect("returner", &[], &returner, None).await;
        rig.disconnect("returner").await;
        let gauge = rig.deps.metrics.noted_guests.clone();
        let noted = || gauge.get();
        let deadline = tokio::time::Instant::now() + WAIT;
        rig.send(Command::Resync).await;
        while noted() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reconciler still remembers {} guests after all 201 disconnected",
                noted()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rig.connect("returner", &[], &returner, None).await;
        rig.until_targets(id, "the returning target acked", |t| {
            state_of(t, "returner") == Some(TargetState::Acked)
        })
        .await;
        assert_eq!(returner.pushes().len(), 1, "pushed exactly once");
        rig.send(Command::Resync).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(noted(), 1, "only the live tunnel is remembered");
        rig.stop().await;
    })
    .await;
}

// Several replicas on one database (`Deps::shared`). The rig's store stands for the shared
// database; "another replica" is a write straight into it, announced on the change feed as
// PostgreSQL's NOTIFY would.

impl Rig {
    /// A rig whose reconciler runs as one replica among several.
    async fn shared(policy: &str) -> Self {
        let mut rig = Self::new(policy).await;
        rig.deps.shared = true;
        rig
    }

    /// Another replica creates a rollout and announces it.
    async fn create_elsewhere(&self, targets: &[&str]) -> i64 {
        let new = NewRollout {
            sha256: self.sha256.clone(),
            ..NewRollout::for_test(PATH, 1)
        };
        let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        let id = self
            .store
            .create_rollout(&new, &targets)
            .await
            .unwrap()
            .rollout
            .id;
        self.deps.changes.publish(Change::Rollout(id));
        id
    }

    /// Another replica stores `guest`'s ack (announced when `announce`).
    async fn ack_elsewhere(&self, id: i64, guest: &str, announce: bool) {
        let mut row = TargetRecord::pending(id, guest);
        row.state = TargetState::Acked;
        row.attempts = 1;
        row.held_version = Some(1);
        row.hook_status = Some(0);
        self.store.write_targets(&[row]).await.unwrap();
        if announce {
            self.deps.changes.publish(Change::Rollout(id));
        }
    }

    /// Waits for an event of rollout `id` satisfying `cond` on `events`.
    async fn until_event(
        events: &mut broadcast::Receiver<Arc<RolloutEvent>>,
        id: i64,
        what: &str,
        cond: impl Fn(&RolloutEvent) -> bool,
    ) -> Arc<RolloutEvent> {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = events.recv().await.unwrap();
                if e.rollout_id == id && cond(&e) {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never seen: {what}"))
    }
}

#[tokio::test]
async fn shared_a_rollout_another_replica_starts_is_delivered_to_the_guests_held_here() {
    local(async {
        let mut rig = Rig::shared(ALLOW_ALL).await;
        let here = RecordingGuest::new(Behaviour::Ack);
        rig.connect("here", &[("app", "db")], &here, None).await;
        rig.start();
        let id = rig.create_elsewhere(&["here", "there"]).await;
        rig.until_targets(id, "the guest held here acked", |t| {
            state_of(t, "here") == Some(TargetState::Acked)
        })
        .await;
        assert_eq!(here.pushes().len(), 1);
        // "there" is another replica's to deliver: outstanding, so the rollout runs on.
        assert_eq!(rig.state(id).await, RolloutState::Running);
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shared_completion_and_counts_include_the_acks_of_other_replicas() {
    local(async {
        let mut rig = Rig::shared(ALLOW_ALL).await;
        let mut events = rig.events.subscribe();
        let here = RecordingGuest::new(Behaviour::Ack);
        rig.connect("here", &[("app", "db")], &here, None).await;
        rig.start();
        let id = rig.create_elsewhere(&["here", "there"]).await;
        Rig::until_event(&mut events, id, "one ack counted", |e| {
            e.counts.get(&TargetState::Acked) == Some(&1)
        })
        .await;
        assert_eq!(rig.state(id).await, RolloutState::Running);
        rig.ack_elsewhere(id, "there", true).await;
        let e = Rig::until_event(&mut events, id, "both acks counted", |e| {
            e.counts.get(&TargetState::Acked) == Some(&2)
        })
        .await;
        assert_eq!(e.counts.get(&TargetState::Pending), Some(&0), "{e:?}");
        rig.until_state(id, RolloutState::Completed).await;
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shared_a_guest_acked_on_another_replica_is_not_pushed_again_when_it_moves_here() {
    local(async {
        let mut rig = Rig::shared(ALLOW_ALL).await;
        let mut events = rig.events.subscribe();
        rig.start();
        let id = rig.create_elsewhere(&["mover", "new"]).await;
        Rig::until_event(&mut events, id, "the rollout followed", |_| true).await;
        // Acked by the replica it was on; that replica's announcement is not awaited.
        rig.ack_elsewhere(id, "mover", false).await;
        let (mover, new) = (
            RecordingGuest::new(Behaviour::Ack),
            RecordingGuest::new(Behaviour::Ack),
        );
        rig.connect("mover", &[("app", "db")], &mover, None).await;
        rig.connect("new", &[("app", "db")], &new, None).await;
        let t = rig
            .until_targets(id, "the other guest acked", |t| {
                state_of(t, "new") == Some(TargetState::Acked)
            })
            .await;
        assert!(mover.pushes().is_empty(), "pushed again after moving");
        assert_eq!((t["mover"].attempts, t["mover"].already_held), (1, false));
        rig.until_state(id, RolloutState::Completed).await;
        rig.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shared_a_pause_and_resume_on_another_replica_hold_and_release_pushes_here() {
    local(async {
        let mut rig = Rig::shared(ALLOW_ALL).await;
        let mut events = rig.events.subscribe();
        rig.start();
        let id = rig.create_elsewhere(&["late"]).await;
        Rig::until_event(&mut events, id, "the rollout followed", |_| true).await;
        rig.store
            .set_rollout_state(id, RolloutState::Paused, "pause by ops")
            .await
            .unwrap();
        rig.deps.changes.publish(Change::Rollout(id));
        Rig::until_event(&mut events, id, "the pause followed", |e| {
            e.state == RolloutState::Paused
        })
        .await;
        let late = RecordingGuest::new(Behaviour::Ack);
        rig.connect("late", &[("app", "db")], &late, None).await;
        // A reconcile pass later, still nothing pushed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(late.pushes().is_empty(), "pushed while paused elsewhere");
        rig.store
            .set_rollout_state(id, RolloutState::Running, "resume by ops")
            .await
            .unwrap();
        rig.deps.changes.publish(Change::Rollout(id));
        rig.until_targets(id, "the late guest acked", |t| {
            state_of(t, "late") == Some(TargetState::Acked)
        })
        .await;
        rig.until_state(id, RolloutState::Completed).await;
        rig.stop().await;
    })
    .await;
}

/// Counting a large rollout's targets in a shared database is dear: the gap between two
/// read-backs grows with what the last one took, so three replicas counting 30,000 rows
/// each time a batch of acks lands do not keep the database busy doing only that.
#[test]
fn read_backs_of_a_shared_store_are_spaced_by_their_cost() {
    use super::{RECONCILE_EVERY, RECOUNT_DELAY, recount_delay};
    assert_eq!(recount_delay(Duration::ZERO), RECOUNT_DELAY);
    assert_eq!(recount_delay(Duration::from_millis(4)), RECOUNT_DELAY);
    assert_eq!(
        recount_delay(Duration::from_millis(25)),
        Duration::from_millis(250)
    );
    assert_eq!(
        recount_delay(Duration::from_millis(150)),
        Duration::from_millis(1500)
    );
    assert_eq!(recount_delay(Duration::from_secs(5)), RECONCILE_EVERY);
}
