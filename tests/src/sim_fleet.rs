//! A simulated fleet for load and fault tools: N guests in this process, each attesting for
//! real (sample TEE) and holding a real tunnel, reconnecting with the daemon's backoff and
//! re-attesting when told to, as `guest-daemon run` does. Each guest opens every push with
//! its own key and applies a version as the daemon does: a newer one once (counted in its
//! ledger), the one it holds as `already_held`, an older one refused as a downgrade.
//!
//! Given several KBS URLs ([`SimFleet::spawn_across`]), a guest fails over between them as
//! `guest-daemon run` with a repeated `--kbs-url` does: after a failed attestation or
//! connection, or a lost tunnel, it moves to the next URL of its list and attests there
//! (the token is dropped), after the usual backoff. Guest `i` starts on URL `i % n` and the
//! rest of its list is rotated by guest, so the guests of one URL spread evenly over the
//! others when it fails.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::{Applied, GuestError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnel::{Backoff, GuestTunnelConfig, ReconnectPolicy};

use crate::{StubGuest, guest_info, init_data, tunnel_url, unseal_with};

/// How the simulated guests are named, labelled and behave.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Guest ids are `<prefix>-00042`.
    pub id_prefix: String,
    /// The one label every guest carries (`key`, `value`).
    pub label: (String, String),
    /// Time a guest takes to apply a new version after counting it, before it answers.
    pub apply_time: Duration,
    /// Guests attesting and connecting at once for their first tunnel.
    pub connect_concurrency: usize,
    /// Reconnect delays: the daemon's (0.5 s doubling to 30 s, full jitter), stable after
    /// 5 s rather than 60 so that faults a few seconds apart do not pile up delays.
    pub reconnect: ReconnectPolicy,
    /// Source address of the tunnels (`127.0.0.12`, say), so that many guests on one host
    /// do not run out of ephemeral ports towards one KBS; `None`: the system's choice.
    pub local_addr: Option<std::net::IpAddr>,
}

impl SimOptions {
    /// Guests `<prefix>-NNNNN` labelled `label`, applying at once.
    pub fn new(id_prefix: &str, label: (&str, &str)) -> Self {
        Self {
            id_prefix: id_prefix.into(),
            label: (label.0.into(), label.1.into()),
            apply_time: Duration::ZERO,
            connect_concurrency: 32,
            reconnect: ReconnectPolicy {
                stable_after: Duration::from_secs(5),
                ..ReconnectPolicy::default()
            },
            local_addr: None,
        }
    }
}

/// What one guest has applied: version -> times, and the version it holds.
#[derive(Default)]
struct Ledger {
    held: u64,
    applied: BTreeMap<u64, u32>,
}

struct Shared {
    ledgers: Vec<Mutex<Ledger>>,
    connected: AtomicUsize,
    opened: AtomicUsize,
    errors: AtomicUsize,
    /// Tunnels ended by the KBS's GoAway (a drain), rather than lost or closed otherwise.
    went_away: AtomicUsize,
}

impl Shared {
    fn ledger(&self, i: usize) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledgers[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fleet (stopped on [`SimFleet::stop`], or aborted on drop).
pub struct SimFleet {
    shared: Arc<Shared>,
    prefix: String,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl SimFleet {
    /// Starts `n` guests against the KBS at `url` (plain HTTP).
    pub fn spawn(url: &str, n: usize, options: &SimOptions) -> Self {
        Self::spawn_across(&[url.to_owned()], n, options)
    }

    /// Starts `n` guests against the KBSes (replicas) at `urls` (plain HTTP, at least one):
    /// guest `i` starts on `urls[i % urls.len()]` and fails over to the others.
    pub fn spawn_across(urls: &[String], n: usize, options: &SimOptions) -> Self {
        assert!(!urls.is_empty(), "SimFleet needs at least one KBS URL");
        let shared = Arc::new(Shared {
            ledgers: (0..n).map(|_| Mutex::default()).collect(),
            connected: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            went_away: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let first = Arc::new(Semaphore::new(options.connect_concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for index in 0..n {
            tasks.spawn(guest(Guest {
                urls: failover_order(urls, index),
                shared: shared.clone(),
                index,
                id: format!("{}-{index:05}", options.id_prefix),
                options: options.clone(),
                first: first.clone(),
                stop: stop.clone(),
            }));
        }
        Self {
            shared,
            prefix: options.id_prefix.clone(),
            stop,
            tasks,
        }
    }

    /// Number of guests.
    pub fn len(&self) -> usize {
        self.shared.ledgers.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of guest `index`.
    pub fn guest_id(&self, index: usize) -> String {
        format!("{}-{index:05}", self.prefix)
    }

    /// Guests with a live tunnel now.
    pub fn connected(&self) -> usize {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Tunnels opened so far (reconnects included).
    pub fn opened(&self) -> usize {
        self.shared.opened.load(Ordering::Relaxed)
    }

    /// Failed attestations and tunnel attempts so far (each retried).
    pub fn errors(&self) -> usize {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Tunnels the KBS ended with GoAway so far (a drain or a restart), as opposed to lost
    /// (a crash, a network fault) or closed for another reason.
    pub fn went_away(&self) -> usize {
        self.shared.went_away.load(Ordering::Relaxed)
    }

    /// Versions guest `index` applied, with how many times each.
    pub fn applied(&self, index: usize) -> BTreeMap<u64, u32> {
        self.shared.ledger(index).applied.clone()
    }

    /// Waits until at least `n` guests have a tunnel, for at most `within`.
    pub async fn wait_connected(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.connected() < n {
            if started.elapsed() > within {
                bail!(
                    "{} of {n} guests connected after {within:?}",
                    self.connected()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Every guest closes its tunnel and stops; the ledgers stay readable.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Guest `index`'s URLs in the order it tries them: `urls[index % n]` first, then the
/// others, rotated by `index / n` so that the guests starting on one URL do not all move to
/// the same next one.
fn failover_order(urls: &[String], index: usize) -> Vec<String> {
    let n = urls.len();
    let first = index % n;
    let mut others: Vec<String> = (1..n).map(|k| urls[(first + k) % n].clone()).collect();
    if !others.is_empty() {
        let len = others.len();
        others.rotate_left((index / n) % len);
    }
    std::iter::once(urls[first].clone()).chain(others).collect()
}

struct Guest {
    /// The KBS URLs in the order this guest tries them (never empty).
    urls: Vec<String>,
    shared: Arc<Shared>,
    index: usize,
    id: String,
    options: SimOptions,
    first: Arc<Semaphore>,
    stop: CancellationToken,
}

/// A guest as the daemon applies: open the push, apply a newer version once, answer
/// `already_held` for the held one, refuse an older one.
fn service(
    shared: Arc<Shared>,
    index: usize,
    key: Arc<TeeKeyPair>,
    push_key: Option<tunnel::PushKey>,
    apply_time: Duration,
) -> StubGuest {
    StubGuest::new().refusing_bundles().on_apply(move |r| {
        let opened = key
            .open_json_with(&r.jwe, push_key.as_ref().map(tunnel::PushKey::bytes))
            .map_err(|e| GuestError::Unseal(e.to_string()));
        let answer = opened.and_then(|_| {
            let mut ledger = shared.ledger(index);
            if r.version < ledger.held {
                return Err(GuestError::Downgrade {
                    held: ledger.held,
                    offered: r.version,
                });
            }
            let already_held = r.version == ledger.held;
            if !already_held {
                ledger.held = r.version;
                *ledger.applied.entry(r.version).or_default() += 1;
            }
            Ok((already_held, r))
        });
        async move {
            let (already_held, r) = answer?;
            if !already_held && !apply_time.is_zero() {
                tokio::time::sleep(apply_time).await;
            }
            Ok(Applied {
                uri: r.uri,
                version: r.version,
                sha256: r.sha256,
                already_held,
                hook_status: None,
            })
        }
    })
}

/// One guest's life, until `stop`.
async fn guest(g: Guest) {
    let key = Arc::new(TeeKeyPair::new_ec());
    let label = (g.options.label.0.as_str(), g.options.label.1.as_str());
    let init = init_data(&g.id, &[label]);
    let configs: Vec<GuestTunnelConfig> = g
        .urls
        .iter()
        .map(|u| {
            let mut config = GuestTunnelConfig::new(tunnel_url(u));
            config.local_addr = g.options.local_addr;
            config
        })
        .collect();
    let mut current = 0;
    let mut backoff = Backoff::new(g.options.reconnect.clone());
    let mut token: Option<String> = None;
    let mut permit = g.first.clone().acquire_owned().await.ok();
    loop {
        let (url, config) = (&g.urls[current], &configs[current]);
        let attempt = async {
            let jwt = match &token {
                Some(t) => t.clone(),
                None => token
                    .insert(crate::attest(url, None, &key, Some(&init)).await?)
                    .clone(),
            };
            let info = guest_info(&g.id, "sim", &["resources"]);
            Ok::<_, anyhow::Error>(tunnel::connect(config, &jwt, info, unseal_with(&key)).await?)
        };
        let attempt = tokio::select! {
            () = g.stop.cancelled() => return,
            attempt = attempt => attempt,
        };
        let delay = match attempt {
            Ok(tunnel) => {
                drop(permit.take());
                let push_key = tunnel.welcome().push_key.clone();
                let session = tunnel.session();
                g.shared.opened.fetch_add(1, Ordering::Relaxed);
                g.shared.connected.fetch_add(1, Ordering::Relaxed);
                let served = tunnel.serve(service(
                    g.shared.clone(),
                    g.index,
                    key.clone(),
                    push_key,
                    g.options.apply_time,
                ));
                let closed = tokio::select! {
                    closed = served => Some(closed),
                    () = g.stop.cancelled() => None,
                };
                g.shared.connected.fetch_sub(1, Ordering::Relaxed);
                let Some(closed) = closed else {
                    session.close();
                    return;
                };
                if closed.needs_reattest() {
                    token = None;
                }
                if closed.reconnect_after.is_some() {
                    g.shared.went_away.fetch_add(1, Ordering::Relaxed);
                }
                backoff.after_close(&closed, &mut rand::thread_rng())
            }
            Err(e) => {
                g.shared.errors.fetch_add(1, Ordering::Relaxed);
                if e.downcast_ref::<tunnel::ConnectError>()
                    .is_some_and(tunnel::ConnectError::needs_reattest)
                {
                    token = None;
                }
                backoff.next_delay(&mut rand::thread_rng())
            }
        };
        // As the daemon: the next attempt goes to the next KBS, with a fresh token.
        if configs.len() > 1 {
            current = (current + 1) % configs.len();
            token = None;
        }
        tokio::select! {
            () = g.stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::failover_order;

    #[test]
    fn each_url_s_guests_fail_over_evenly_to_the_others() {
        let urls: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let orders: Vec<Vec<String>> = (0..6).map(|i| failover_order(&urls, i)).collect();
        assert_eq!(orders[0], ["a", "b", "c"]);
        assert_eq!(orders[1], ["b", "c", "a"]);
        assert_eq!(orders[3], ["a", "c", "b"]);
        assert_eq!(orders[4], ["b", "a", "c"]);
        // The guests starting on b (1 and 4) go next to c and to a: one each.
        let next_of_b: Vec<&str> = [1, 4].map(|i| orders[i][1].as_str()).to_vec();
        assert_eq!(next_of_b, ["c", "a"]);
        assert_eq!(failover_order(&urls[..1], 7), ["a"]);
    }
}
