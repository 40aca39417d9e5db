//! The kill -9 fault loop (issue 17): a real `kbs` process, simulated guests on real tunnels
//! in this process, and per iteration a new resource version rolled out to all of them, the
//! KBS killed with SIGKILL while some targets are acked and others pending, restarted on the
//! same data directory and port, and the rollout followed to its end. Each guest counts the
//! versions it applies; at the end every guest must have applied every version exactly once,
//! every rollout must have finished with all its targets acked, and each rollout's acked
//! count must equal the number of guests that hold its version. `examples/fault_loop.rs`
//! runs it at scale, `tests/tests/fault_loop.rs` small in CI.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use kbs_core::storage::{RolloutState, TargetState};
use plugin_rotation::{RolloutView, StartRollout};
use server::admin_client::AdminClient;

use crate::{ALLOW_SAMPLE, KbsChild, SimFleet, SimOptions};

/// The resource every iteration publishes a new version of.
pub const FAULT_PATH: &str = "default/key/fault-loop";
const LABEL: (&str, &str) = ("fault", "loop");

/// What to run.
#[derive(Clone, Debug)]
pub struct FaultLoopConfig {
    /// The `kbs` binary.
    pub kbs_bin: PathBuf,
    /// Simulated guests.
    pub guests: usize,
    /// Kill-restart rounds, one new version each.
    pub iterations: usize,
    /// Pushes in flight per rollout (small enough that a kill lands mid-rollout).
    pub max_concurrent: u32,
    /// How long a guest takes to apply a version (after it counted it, before it answers:
    /// the daemon's hook), so kills also land between an apply and its ack.
    pub apply_time: Duration,
    /// Guests attesting and connecting at once at set-up.
    pub connect_concurrency: usize,
    /// Longest wait for a rollout to finish after a restart.
    pub settle_within: Duration,
    /// `RUST_LOG` of the KBS.
    pub kbs_log: String,
}

impl FaultLoopConfig {
    /// `guests` guests, `iterations` rounds, the other settings at their defaults.
    pub fn new(kbs_bin: PathBuf, guests: usize, iterations: usize) -> Self {
        Self {
            kbs_bin,
            guests,
            iterations,
            max_concurrent: 32,
            apply_time: Duration::from_millis(5),
            connect_concurrency: 32,
            settle_within: Duration::from_secs(120),
            kbs_log: "error".into(),
        }
    }
}

/// One kill-restart round.
#[derive(Clone, Debug)]
pub struct Iteration {
    /// The version rolled out.
    pub version: u64,
    /// Its rollout.
    pub rollout_id: i64,
    /// Acked targets the last look before the kill saw.
    pub acked_at_kill: u64,
    /// Targets pending or delivering then.
    pub outstanding_at_kill: u64,
    /// False when the rollout finished before the kill point (no mid-rollout kill).
    pub killed_mid_rollout: bool,
    /// Kill -> `/readyz` answers again.
    pub restart: Duration,
    /// Kill -> every guest has a tunnel again.
    pub reconnect: Duration,
    /// Rollout start -> every target acked.
    pub total: Duration,
}

impl Iteration {
    /// One row of the report's table (round `i`, from 0).
    pub fn line(&self, i: usize) -> String {
        let ms = |d: Duration| format!("{:.0}ms", d.as_secs_f64() * 1e3);
        format!(
            "{:>4} {:>8} {:>8} {:>8} {:>12} {:>10} {:>10} {:>10}",
            i + 1,
            self.version,
            self.acked_at_kill,
            self.outstanding_at_kill,
            self.killed_mid_rollout,
            ms(self.restart),
            ms(self.reconnect),
            ms(self.total),
        )
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct FaultLoopReport {
    /// Attest and connect every guest.
    pub setup: Duration,
    /// Each round.
    pub iterations: Vec<Iteration>,
    /// Broken promises, one line each; empty when all held.
    pub violations: Vec<String>,
    /// Tunnels the guests opened in all (first connections included).
    pub tunnels_opened: usize,
}

impl FaultLoopReport {
    /// The figures, one line per iteration then a summary.
    pub fn print(&self) {
        println!(
            "{:>4} {:>8} {:>8} {:>8} {:>12} {:>10} {:>10} {:>10}",
            "iter", "version", "acked", "pending", "mid-rollout", "restart", "reconnect", "total"
        );
        let ms = |d: Duration| format!("{:.0}ms", d.as_secs_f64() * 1e3);
        for (i, it) in self.iterations.iter().enumerate() {
            println!("{}", it.line(i));
        }
        let n = self.iterations.len().max(1) as u32;
        let sum = |f: fn(&Iteration) -> Duration| self.iterations.iter().map(f).sum::<Duration>();
        let max =
            |f: fn(&Iteration) -> Duration| self.iterations.iter().map(f).max().unwrap_or_default();
        println!(
            "\n{} iterations ({} killed mid-rollout); set-up {}; per iteration: mean {}, \
             restart mean {} (max {}), reconnect mean {} (max {}); {} tunnels opened",
            self.iterations.len(),
            self.iterations
                .iter()
                .filter(|i| i.killed_mid_rollout)
                .count(),
            ms(self.setup),
            ms(sum(|i| i.total) / n),
            ms(sum(|i| i.restart) / n),
            ms(max(|i| i.restart)),
            ms(sum(|i| i.reconnect) / n),
            ms(max(|i| i.reconnect)),
            self.tunnels_opened,
        );
        if self.violations.is_empty() {
            println!(
                "OK: every guest applied every version exactly once; every rollout finished with all targets acked; acked counts match the guests' own"
            );
        } else {
            println!("{} VIOLATIONS:", self.violations.len());
            for v in &self.violations {
                println!("  {v}");
            }
        }
    }
}

/// Calls `f` until it succeeds (the KBS may be restarting), for at most `within`.
async fn retry<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < within => {
                tracing::debug!(error = %e, "{what}: retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.context(format!("{what} (tried for {within:?})"))),
        }
    }
}

async fn view(admin: &AdminClient, id: i64) -> anyhow::Result<RolloutView> {
    Ok(admin.rollout(id, "limit=1").await?.view)
}

fn count(v: &RolloutView, s: TargetState) -> u64 {
    v.counts.get(&s).copied().unwrap_or(0)
}

/// Runs the loop; `Err` only when the loop itself cannot go on (the KBS does not start, a
/// rollout never finishes), every broken promise it can check is in the report.
pub async fn run_fault_loop(cfg: &FaultLoopConfig) -> anyhow::Result<FaultLoopReport> {
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("kbs.toml");
    // Tokens outlive the run, so guests re-attest only when the KBS refuses theirs.
    std::fs::write(&config_file, "[attestation]\ntoken_ttl = \"12h\"\n")?;
    let mut kbs = KbsChild::start(
        &cfg.kbs_bin,
        &dir.path().join("data"),
        Some(&config_file),
        &cfg.kbs_log,
    )
    .await?;
    let admin = kbs.admin()?;
    admin.set_policy(ALLOW_SAMPLE).await?;
    let url = kbs.url();

    let started = Instant::now();
    let mut fleet = SimFleet::spawn(
        &url,
        cfg.guests,
        &SimOptions {
            apply_time: cfg.apply_time,
            connect_concurrency: cfg.connect_concurrency,
            ..SimOptions::new("fault", LABEL)
        },
    );
    let mut report = FaultLoopReport::default();
    let result = async {
        fleet
            .wait_connected(cfg.guests, Duration::from_secs(600))
            .await?;
        report.setup = started.elapsed();
        println!(
            "{} guests connected in {:.1} s",
            cfg.guests,
            report.setup.as_secs_f64()
        );
        for i in 0..cfg.iterations {
            let it = iteration(cfg, &mut kbs, &admin, &fleet, i).await?;
            println!("{}", it.line(i));
            report.iterations.push(it);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    report.tunnels_opened = fleet.opened();
    fleet.stop().await;
    result?;
    check(&admin, &fleet, &mut report).await?;
    kbs.kill9().await;
    Ok(report)
}

async fn iteration(
    cfg: &FaultLoopConfig,
    kbs: &mut KbsChild,
    admin: &AdminClient,
    fleet: &SimFleet,
    i: usize,
) -> anyhow::Result<Iteration> {
    let put = admin
        .put_resource(
            FAULT_PATH,
            format!("fault loop version {}", i + 1).into_bytes(),
        )
        .await?;
    let version = put["version"]
        .as_u64()
        .context("the put answers its version")?;
    let total = cfg.guests as u64;
    // Spread the kill over the rollout: a quarter, half, three quarters acked.
    let kill_at = (total * (i as u64 % 3 + 1) / 4).max(1);
    let t0 = Instant::now();
    let rollout = admin
        .start_rollout(&StartRollout {
            path: FAULT_PATH.into(),
            version: Some(version),
            selector: format!("{}={}", LABEL.0, LABEL.1),
            max_concurrent: Some(cfg.max_concurrent),
            max_attempts: Some(20),
            ..StartRollout::default()
        })
        .await?;
    let id = rollout.rollout.id;
    if rollout.total != total {
        bail!("rollout {id} has {} targets, not {total}", rollout.total);
    }
    let (acked_at_kill, outstanding_at_kill) = loop {
        let v = view(admin, id).await?;
        let acked = count(&v, TargetState::Acked);
        let outstanding = count(&v, TargetState::Pending) + count(&v, TargetState::Delivering);
        if acked >= kill_at || outstanding == 0 {
            break (acked, outstanding);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let killed = Instant::now();
    kbs.kill9().await;
    kbs.restart().await?;
    let restart = killed.elapsed();
    fleet.wait_connected(cfg.guests, cfg.settle_within).await?;
    let reconnect = killed.elapsed();
    let done = retry(cfg.settle_within, "rollout completion", || async {
        let v = view(admin, id).await?;
        // `done` comes with the last ack; the state turns `completed` a moment later.
        if v.done && v.rollout.state != RolloutState::Running {
            Ok(v)
        } else {
            bail!("rollout {id} not done: {:?}", v.counts)
        }
    })
    .await?;
    if done.rollout.state != RolloutState::Completed {
        bail!(
            "rollout {id} ended {:?}: {:?}",
            done.rollout.state,
            done.counts
        );
    }
    Ok(Iteration {
        version,
        rollout_id: id,
        acked_at_kill,
        outstanding_at_kill,
        killed_mid_rollout: acked_at_kill > 0 && outstanding_at_kill > 0,
        restart,
        reconnect,
        total: t0.elapsed(),
    })
}

/// The promises, checked against the KBS's rollouts and the guests' own ledgers.
async fn check(
    admin: &AdminClient,
    fleet: &SimFleet,
    report: &mut FaultLoopReport,
) -> anyhow::Result<()> {
    let n = fleet.len() as u64;
    let versions: Vec<(u64, i64)> = report
        .iterations
        .iter()
        .map(|it| (it.version, it.rollout_id))
        .collect();
    let details = futures::stream::iter(versions.iter().map(|&(_, id)| async move {
        retry(Duration::from_secs(30), "reading a rollout", || async {
            view(admin, id).await
        })
        .await
    }))
    .buffered(8)
    .collect::<Vec<_>>()
    .await;
    let v = &mut report.violations;
    for ((version, id), detail) in versions.iter().zip(details) {
        let detail = detail?;
        let acked = count(&detail, TargetState::Acked);
        // Each finished `completed` (checked when its round ended); the next round's rollout
        // of the same path then supersedes it.
        let finished = matches!(
            detail.rollout.state,
            RolloutState::Completed | RolloutState::Superseded
        );
        if !finished || acked != n || detail.total != n {
            v.push(format!(
                "rollout {id} (version {version}): {:?} with {acked} of {n} acked, counts {:?}",
                detail.rollout.state, detail.counts
            ));
        }
        let holders = (0..fleet.len())
            .filter(|&g| fleet.applied(g).contains_key(version))
            .count() as u64;
        if holders != acked {
            v.push(format!(
                "rollout {id} (version {version}): {acked} acked but {holders} guests applied it"
            ));
        }
    }
    for g in 0..fleet.len() {
        let applied = fleet.applied(g);
        for (version, _) in &versions {
            match applied.get(version) {
                Some(1) => {}
                Some(times) => v.push(format!(
                    "{} applied version {version} {times} times",
                    fleet.guest_id(g)
                )),
                None => v.push(format!(
                    "{} never applied version {version}",
                    fleet.guest_id(g)
                )),
            }
        }
        for extra in applied
            .keys()
            .filter(|k| !versions.iter().any(|(v, _)| v == *k))
        {
            v.push(format!(
                "{} applied version {extra}, which no rollout of the loop sent",
                fleet.guest_id(g)
            ));
        }
    }
    Ok(())
}
