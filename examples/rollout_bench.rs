//! Rotation fan-out benchmark: a real `kbs` process, N simulated guests in this process (each
//! attests for real with the sample TEE, holds a real tunnel over loopback and unseals what
//! it is pushed with its own TEE key), then one rollout to all of them. Reports the time from
//! `POST /kbs/v0/rotation/rollouts` until the KBS reports every guest acked, per-guest delivery
//! latency (rollout start -> the guest applied it) and the KBS's CPU time.
//!
//! ```sh
//! cargo build --release --bin kbs
//! cargo run --release -p examples --example rollout_bench -- --guests 10000
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use examples::{
    AttestedGuest, KbsProcess, connect_fleet, default_kbs_bin, percentile, proc_cpu_time,
};
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::storage::TargetState;
use plugin_rotation::StartRollout;
use rpc_defs::GuestError;
use server::admin_client::RolloutUpdate;
use tests::{StubGuest, acknowledge, unseal_with};

#[derive(Parser, Debug)]
struct Args {
    /// Simulated guests.
    #[arg(long, default_value_t = 10_000)]
    guests: usize,
    /// Pushes in flight at once (comma-separated: one rollout each).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    max_concurrent: Vec<u32>,
    /// Guests attesting and connecting at once during set-up.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The kbs binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
    /// Guests offer only `tether.v1`: pushes are sealed to their TEE keys (ECDH-ES on both
    /// sides per push) instead of their tunnels' push keys.
    #[arg(long)]
    no_push_key: bool,
}

/// When each push was applied (the guest side of the latency).
type Applies = Arc<Mutex<Vec<Instant>>>;

/// Opens every pushed resource as a real guest does (the CPU cost of the guest side is part
/// of the figure), notes when, and acknowledges it.
fn sim_guest(key: TeeKeyPair, push_key: Option<tunnel::PushKey>, applies: Applies) -> StubGuest {
    StubGuest::new().refusing_bundles().on_apply(move |r| {
        let opened = key
            .open_json_with(&r.jwe, push_key.as_ref().map(tunnel::PushKey::bytes))
            .map_err(|e| GuestError::Unseal(e.to_string()));
        if opened.is_ok()
            && let Ok(mut a) = applies.lock()
        {
            a.push(Instant::now());
        }
        async move { opened.map(|_| acknowledge(r)) }
    })
}

fn main() -> anyhow::Result<()> {
    examples::block_on_multi_thread(run(Args::parse()))
}

async fn connect(
    url: &str,
    index: usize,
    applies: Applies,
    push_key: bool,
) -> anyhow::Result<tunnel::TunnelSession> {
    let guest = AttestedGuest::attest(url, index, &[("app", "bench")]).await?;
    let mut config = tunnel::GuestTunnelConfig::new(tests::tunnel_url(url));
    config.offer_push_key = push_key;
    let tunnel =
        tunnel::connect(&config, &guest.token, guest.info(), unseal_with(&guest.key)).await?;
    let session = tunnel.session();
    let push_key = tunnel.welcome().push_key.clone();
    tokio::spawn(tunnel.serve(sim_guest(guest.key, push_key, applies)));
    Ok(session)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args.kbs_bin.clone().unwrap_or_else(default_kbs_bin);
    let kbs = KbsProcess::start(&bin, &[]).await?;
    let admin = Arc::new(kbs.admin()?);
    admin
        .set_policy(include_str!("policies/allow-sample.rego"))
        .await?;
    let path = "default/key/bench";

    let applies: Applies = Arc::new(Mutex::new(Vec::with_capacity(args.guests)));
    let started = Instant::now();
    let sessions = connect_fleet(args.guests, args.connect_concurrency, |i| {
        connect(&kbs.url, i, applies.clone(), !args.no_push_key)
    })
    .await?;
    println!(
        "{} guests attested and connected in {:.1} s; KBS RSS {} MiB",
        sessions.len(),
        started.elapsed().as_secs_f64(),
        kbs.rss_kib() / 1024
    );
    // Let the KBS register every tunnel and the reconciler note every guest.
    tokio::time::sleep(Duration::from_secs(3)).await;

    println!(
        "\n{:>14} {:>8} {:>8} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>16}",
        "max_concurrent",
        "targets",
        "acked",
        "all acked",
        "POST",
        "first",
        "p50",
        "p99",
        "last",
        "KBS CPU"
    );
    for (round, &max_concurrent) in args.max_concurrent.iter().enumerate() {
        admin
            .put_resource(path, format!("secret version {round}").into_bytes())
            .await?;
        if let Ok(mut a) = applies.lock() {
            a.clear();
        }
        let cpu0 = proc_cpu_time(kbs.pid());
        let t0 = Instant::now();
        let view = admin
            .start_rollout(&StartRollout {
                path: path.into(),
                selector: "app=bench".into(),
                max_concurrent: Some(max_concurrent),
                ..StartRollout::default()
            })
            .await?;
        let started_in = t0.elapsed();
        let mut watch = admin.watch_rollout(view.rollout.id).await?;
        let mut acked = 0;
        let mut total = view.total;
        while let Some(update) = watch.next().await? {
            let (counts, state) = match update {
                RolloutUpdate::Snapshot(v) => (v.counts, v.rollout.state),
                RolloutUpdate::Change(e) => (e.counts, e.state),
                RolloutUpdate::Error { name, detail } => {
                    eprintln!("event stream: {name}: {detail}");
                    continue;
                }
            };
            acked = counts.get(&TargetState::Acked).copied().unwrap_or(0);
            total = counts.values().sum();
            let outstanding = counts.get(&TargetState::Pending).copied().unwrap_or(0)
                + counts.get(&TargetState::Delivering).copied().unwrap_or(0);
            if outstanding == 0 || !state.in_force() {
                break;
            }
        }
        let wall = t0.elapsed();

        let cpu = proc_cpu_time(kbs.pid()).saturating_sub(cpu0);
        let mut lat: Vec<Duration> = applies
            .lock()
            .map(|a| a.iter().map(|t| t.saturating_duration_since(t0)).collect())
            .unwrap_or_default();
        lat.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:>14} {:>8} {:>8} {:>10.0}ms {:>6.0}ms {:>6.0}ms {:>6.0}ms {:>6.0}ms {:>6.0}ms {:>8.0}ms ({:.0}%)",
            max_concurrent,
            total,
            acked,
            ms(wall),
            ms(started_in),
            ms(lat.first().copied().unwrap_or_default()),
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            ms(lat.last().copied().unwrap_or_default()),
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        );
    }
    drop(sessions);
    Ok(())
}
