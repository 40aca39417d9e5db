//! Handshake load: full RCAR (auth + attest) plus one resource GET per iteration, against a
//! real `kbs` process, at concurrency 1, 2, 4, 8. Prints, per level, duration, handshakes/s,
//! errors, p50, p99 and CPU per handshake against upstream Trustee's figure on this machine,
//! and the server's RSS at start and end. A failed handshake is counted (the first error of
//! each kind is shown) and the client starts a new session; the run goes on.
//!
//! `--sustain 600 --levels 8` is the issue 17 lock-out run: ten minutes at full speed, a line
//! every `--report-every` seconds with the running figures and RSS, which should end with 0
//! errors and a flat RSS.
//!
//! cargo build --release --bin kbs && cargo run --release -p examples --example handshake_load

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use examples::{KbsProcess, default_kbs_bin, percentile, proc_cpu_time};
use guest_daemon::evidence::SampleAttester;
use guest_daemon::rcar::KbsClientBuilder;
use guest_daemon::resource_path::ResourcePath;
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;

/// Upstream Trustee KBS on this machine (docs/operations.md, "Upstream Trustee baseline"): full RCAR + one GET, two streams.
const UPSTREAM_HANDSHAKES_PER_S: f64 = 390.0;

#[derive(Parser)]
struct Args {
    /// Path of the release `kbs` binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Seconds per level for a long run (overrides `--seconds`).
    #[arg(long)]
    sustain: Option<u64>,
    /// Seconds between progress lines during a level longer than this.
    #[arg(long, default_value_t = 30)]
    report_every: u64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    levels: Vec<usize>,
}

/// What the workers of one level count, read by the progress lines while they run.
#[derive(Default)]
struct Tally {
    handshakes: AtomicU64,
    errors: AtomicU64,
    /// Errors by message (the first 100 characters), with their count.
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn fail(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let kind: String = format!("{e:#}").chars().take(100).collect();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        *kinds.entry(kind).or_default() += 1;
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.kbs_bin.unwrap_or_else(default_kbs_bin);
    let seconds = args.sustain.unwrap_or(args.seconds);
    let kbs = KbsProcess::start(&bin, &[]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = kbs.rss_kib();

    let admin = AdminClient::new(
        &kbs.url,
        AdminKeyPair::load(&kbs.data_dir.join("admin.key"))?,
        None,
    )?;
    admin
        .put_resource("default/key/bench", vec![7u8; 32])
        .await?;
    admin
        .set_policy(include_str!("policies/allow-sample.rego"))
        .await?;
    let path: ResourcePath = "default/key/bench".parse().map_err(anyhow::Error::msg)?;

    println!(
        "Tether handshake load: auth + attest + 1 resource GET per handshake (sample TEE, EC P-256 key), {seconds} s per level"
    );
    println!(
        "server RSS at start (idle): {:.1} MiB (target < 20 MiB)",
        mib(idle_rss)
    );
    println!(
        "{:>11} {:>9} {:>11} {:>13} {:>7} {:>9} {:>9} {:>14} {:>14} {:>10} {:>9} {:>9}",
        "concurrency",
        "duration",
        "handshakes",
        "handshakes/s",
        "errors",
        "p50",
        "p99",
        "server CPU/hs",
        "client CPU/hs",
        "vs upstream",
        "RSS start",
        "RSS end"
    );
    let mut total_errors = 0;
    for &c in &args.levels {
        let rss_start = kbs.rss_kib();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let cpu0 = kbs.cpu_time();
        let client_cpu0 = proc_cpu_time(std::process::id());
        let started = Instant::now();
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for _ in 0..c {
            let url = kbs.url.clone();
            let path = path.clone();
            let tally = Arc::clone(&tally);
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let mut client = match KbsClientBuilder::new(
                        url.clone(),
                        Box::new(SampleAttester),
                    )
                    .build()
                    {
                        Ok(client) => client,
                        Err(e) => {
                            tally.fail(&anyhow::Error::from(e));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    // One client (its cookie jar, its connection) until it fails.
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let once = async {
                            client.attest().await?;
                            let data = client.get_resource(&path).await?;
                            anyhow::ensure!(data.len() == 32, "unexpected resource size");
                            Ok(())
                        };
                        match once.await {
                            Ok(()) => {
                                lat.push(t.elapsed());
                                tally.handshakes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tally.fail(&e);
                                break;
                            }
                        }
                    }
                }
                lat
            }));
        }
        if seconds > args.report_every {
            let tally = Arc::clone(&tally);
            let every = Duration::from_secs(args.report_every);
            let pid = kbs.pid();
            tokio::spawn(async move {
                let mut last = 0;
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    if Instant::now() >= deadline {
                        return;
                    }
                    let done = tally.handshakes.load(Ordering::Relaxed);
                    println!(
                        "  {:>6.0} s: {done} handshakes, {:.0}/s over the last {} s, {} errors, server RSS {:.1} MiB",
                        started.elapsed().as_secs_f64(),
                        (done - last) as f64 / every.as_secs_f64(),
                        every.as_secs(),
                        tally.errors.load(Ordering::Relaxed),
                        mib(examples::proc_rss_kib(pid)),
                    );
                    last = done;
                }
            });
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        let elapsed = started.elapsed();
        let cpu = kbs.cpu_time().saturating_sub(cpu0);
        let client_cpu = proc_cpu_time(std::process::id()).saturating_sub(client_cpu0);
        lat.sort();
        let n = lat.len().max(1) as f64;
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        let errors = tally.errors.load(Ordering::Relaxed);
        total_errors += errors;
        println!(
            "{:>11} {:>8.1}s {:>11} {:>13.0} {:>7} {:>7.2}ms {:>7.2}ms {:>12.0}us {:>12.0}us {:>9.1}x {:>5.1} MiB {:>5.1} MiB",
            c,
            elapsed.as_secs_f64(),
            lat.len(),
            rate,
            errors,
            percentile(&lat, 50.0).as_secs_f64() * 1e3,
            percentile(&lat, 99.0).as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / n,
            client_cpu.as_secs_f64() * 1e6 / n,
            rate / UPSTREAM_HANDSHAKES_PER_S,
            mib(rss_start),
            mib(kbs.rss_kib()),
        );
        let kinds = tally.kinds.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, count) in kinds.iter() {
            println!("            {count} x {kind}");
        }
    }
    println!(
        "server RSS at end: {:.1} MiB (start {:.1} MiB); errors: {total_errors}",
        mib(kbs.rss_kib()),
        mib(idle_rss)
    );
    println!(
        "baseline: upstream Trustee KBS, same machine, ~{UPSTREAM_HANDSHAKES_PER_S}/s with two streams (docs/operations.md); target >= 2000/s"
    );
    Ok(())
}
