//! Soak benchmark (issue 17): a real `kbs` process, N simulated guests in this process on
//! real tunnels (default 10,000: the KBS holds one descriptor per tunnel, this process one
//! per guest, both below the 20,000 open-files limit), for `--minutes` (default 60). Meanwhile
//! the KBS's heartbeats ping every tunnel, its probes plugin probes every guest every minute,
//! this tool pings and probes a few guests through the admin API every sample, and a new
//! resource version is rolled out to every guest every minute. Every `--sample-secs` it reads
//! the KBS's RSS (`/proc/<pid>/status`) and open descriptors (`/proc/<pid>/fd`) and prints
//! them; at the end the series' least-squares slopes (KiB/min, fds/min; also over the second
//! half, after warm-up) and the errors. It exits non-zero when a rollout did not finish, or
//! guests are missing at the end.
//!
//! ```sh
//! cargo build --release --bin kbs
//! cargo run --release -p examples --example soak -- --guests 10000 --minutes 60
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use examples::{KbsProcess, default_kbs_bin};
use kbs_core::storage::TargetState;
use plugin_rotation::StartRollout;
use rand::Rng;
use reqwest::Method;
use server::admin_client::{AdminClient, RequestBody};
use tests::{SimFleet, SimOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Simulated guests (tunnels).
    #[arg(long, default_value_t = 10_000)]
    guests: usize,
    /// Duration of the soak, minutes.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Guests pinged and probed through the admin API per sample.
    #[arg(long, default_value_t = 20)]
    calls_per_sample: usize,
    /// Seconds between rollouts.
    #[arg(long, default_value_t = 60)]
    rollout_every: u64,
    /// Guests attesting and connecting at once at set-up.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The kbs binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
}

const PATH: &str = "default/key/soak";

/// One sample of the KBS process.
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Errors by kind.
#[derive(Default, Debug)]
struct Errors {
    pings: u64,
    probes: u64,
    rollouts_unfinished: u64,
    admin: u64,
}

fn main() -> anyhow::Result<()> {
    examples::block_on_multi_thread(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args.kbs_bin.clone().unwrap_or_else(default_kbs_bin);
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("kbs.toml");
    // Tokens outlive the soak (re-attestation is not what it measures); the probes plugin
    // probes every guest every minute.
    std::fs::write(
        &config,
        "[attestation]\ntoken_ttl = \"12h\"\n[plugins.probes]\ninterval = \"1m\"\nconcurrency = 256\n",
    )?;
    let config_arg = config.display().to_string();
    let kbs = KbsProcess::start(&bin, &["--config", &config_arg]).await?;
    let admin = kbs.admin()?;
    admin
        .set_policy(include_str!("policies/allow-sample.rego"))
        .await?;
    let started = Instant::now();
    let mut fleet = SimFleet::spawn(
        &kbs.url,
        args.guests,
        &SimOptions {
            connect_concurrency: args.connect_concurrency,
            ..SimOptions::new("soak", ("app", "soak"))
        },
    );
    fleet
        .wait_connected(args.guests, Duration::from_secs(1800))
        .await?;
    println!(
        "{} guests attested and connected in {:.1} s; KBS pid {}, RSS {} MiB, {} fds",
        args.guests,
        started.elapsed().as_secs_f64(),
        kbs.pid(),
        kbs.rss_kib() / 1024,
        open_fds(kbs.pid())
    );

    let soak = Duration::from_secs(args.minutes * 60);
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut errors = Errors::default();
    let mut rollouts: Vec<(i64, u64)> = Vec::new();
    let mut next_rollout = Duration::ZERO;
    let mut calls = 0u64;
    println!(
        "\n{:>7} {:>10} {:>7} {:>9} {:>8} {:>9} {:>7}",
        "t (s)", "RSS (KiB)", "fds", "connected", "rollouts", "calls", "errors"
    );
    while t0.elapsed() < soak {
        if t0.elapsed() >= next_rollout {
            next_rollout += Duration::from_secs(args.rollout_every);
            if let Some(&(id, version)) = rollouts.last()
                && !rollout_done(&admin, id, args.guests as u64).await
            {
                errors.rollouts_unfinished += 1;
                eprintln!("rollout {id} (version {version}) not finished before the next one");
            }
            match roll_out(&admin, rollouts.len()).await {
                Ok(r) => rollouts.push(r),
                Err(e) => {
                    errors.admin += 1;
                    eprintln!("starting a rollout failed: {e:#}");
                }
            }
        }
        for _ in 0..args.calls_per_sample {
            let id = fleet.guest_id(rand::thread_rng().gen_range(0..fleet.len()));
            calls += 2;
            if admin.ping_guest(&id).await.is_err() {
                errors.pings += 1;
            }
            let probe = admin
                .send(
                    Method::POST,
                    &format!("/kbs/v0/admin/guests/{id}/probe"),
                    Some(RequestBody::Json(serde_json::json!({"kind": "health"}))),
                )
                .await;
            if probe.is_err() {
                errors.probes += 1;
            }
        }
        let s = Sample {
            at: t0.elapsed(),
            rss_kib: kbs.rss_kib(),
            fds: open_fds(kbs.pid()),
        };
        println!(
            "{:>7.0} {:>10} {:>7} {:>9} {:>8} {:>9} {:>7}",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.fds,
            fleet.connected(),
            rollouts.len(),
            calls,
            errors.pings + errors.probes + errors.rollouts_unfinished + errors.admin,
        );
        samples.push(s);
        let next = Duration::from_secs(args.sample_secs * samples.len() as u64);
        tokio::time::sleep(next.saturating_sub(t0.elapsed())).await;
    }
    // The last rollout gets a minute to finish.
    if let Some(&(id, version)) = rollouts.last() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rollout_done(&admin, id, args.guests as u64).await {
            if Instant::now() > deadline {
                errors.rollouts_unfinished += 1;
                eprintln!("the last rollout {id} (version {version}) did not finish");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let connected = fleet.connected();
    let reconnects = fleet.opened().saturating_sub(args.guests);
    let guest_errors = fleet.errors();
    fleet.stop().await;

    let minutes = |s: &Sample| s.at.as_secs_f64() / 60.0;
    let rss: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (minutes(s), s.rss_kib as f64))
        .collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (minutes(s), s.fds as f64)).collect();
    let half = samples.len() / 2;
    let first = samples.first();
    let last = samples.last();
    println!(
        "\n{} guests for {:.1} min, {} samples: RSS {} -> {} KiB, fds {} -> {}",
        args.guests,
        t0.elapsed().as_secs_f64() / 60.0,
        samples.len(),
        first.map_or(0, |s| s.rss_kib),
        last.map_or(0, |s| s.rss_kib),
        first.map_or(0, |s| s.fds),
        last.map_or(0, |s| s.fds),
    );
    println!(
        "slope: RSS {:+.1} KiB/min ({:+.1} over the second half), fds {:+.2}/min ({:+.2} over the second half)",
        slope(&rss),
        slope(&rss[half..]),
        slope(&fds),
        slope(&fds[half..]),
    );
    println!(
        "rollouts {} (unfinished {}), admin pings+probes {calls} (failed: pings {}, probes {}), other admin errors {}, \
         guests connected at the end {connected}/{}, reconnects {reconnects}, guest-side errors {guest_errors}",
        rollouts.len(),
        errors.rollouts_unfinished,
        errors.pings,
        errors.probes,
        errors.admin,
        args.guests,
    );
    if errors.rollouts_unfinished > 0 || connected < args.guests {
        std::process::exit(1);
    }
    Ok(())
}

async fn roll_out(admin: &AdminClient, n: usize) -> anyhow::Result<(i64, u64)> {
    let put = admin
        .put_resource(PATH, format!("soak version {}", n + 1).into_bytes())
        .await?;
    let version = put["version"].as_u64().unwrap_or(0);
    let view = admin
        .start_rollout(&StartRollout {
            path: PATH.into(),
            version: Some(version),
            selector: "app=soak".into(),
            max_concurrent: Some(1000),
            ..StartRollout::default()
        })
        .await?;
    Ok((view.rollout.id, version))
}

async fn rollout_done(admin: &AdminClient, id: i64, guests: u64) -> bool {
    admin.rollout(id, "limit=1").await.is_ok_and(|d| {
        d.view.done && d.view.counts.get(&TargetState::Acked).copied().unwrap_or(0) == guests
    })
}
