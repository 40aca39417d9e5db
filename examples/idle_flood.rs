//! Idle flood: what a KBS holds, and whether it still serves, while one peer throws many
//! sockets that send nothing at it (issue 17 defect 2). Against a real release `kbs` with its
//! default `[http]` caps: a guest connects its tunnel, then `--sockets` silent TCP
//! connections are opened and held for `--hold` seconds while `/healthz` is asked every
//! 50 ms on a fresh connection; then a second guest attests and connects. Prints `/healthz`
//! latencies and failures, the KBS's descriptors and RSS, evictions, and whether both
//! tunnels are up.
//!
//! Both processes stay under 20,000 descriptors (the default `--sockets` is 15,000).
//!
//! cargo build --release --bin kbs && cargo run --release -p examples --example idle_flood

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use examples::{AttestedGuest, KbsProcess, default_kbs_bin, percentile};
use futures::StreamExt;
use tests::{StubGuest, TunnelGuest};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// Path of the release `kbs` binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
    /// Silent sockets to open and hold.
    #[arg(long, default_value_t = 15_000)]
    sockets: usize,
    /// Seconds to hold them once opened.
    #[arg(long, default_value_t = 20)]
    hold: u64,
}

/// Descriptors a process holds now.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

async fn tunnel_guest(url: &str, index: usize) -> anyhow::Result<TunnelGuest> {
    let guest = AttestedGuest::attest(url, index, &[("app", "flood")]).await?;
    let config = tunnel::GuestTunnelConfig::new(tests::tunnel_url(url));
    Ok(TunnelGuest::dial(
        &config,
        &guest.token,
        guest.info(),
        &guest.key,
        StubGuest::new(),
    )
    .await?)
}

fn main() -> anyhow::Result<()> {
    examples::block_on_multi_thread(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args.kbs_bin.unwrap_or_else(default_kbs_bin);
    let kbs = KbsProcess::start(&bin, &[]).await?;
    kbs.admin()?
        .set_policy(include_str!("policies/allow-sample.rego"))
        .await?;
    let pid = kbs.pid();
    let rss_start = kbs.rss_kib();
    let first = tunnel_guest(&kbs.url, 0).await?;

    // /healthz every 50 ms on a fresh connection, for the whole flood.
    let stop = Arc::new(AtomicBool::new(false));
    let max_fds = Arc::new(AtomicU64::new(open_fds(pid)));
    let probe = {
        let (url, stop, max_fds) = (kbs.url.clone(), Arc::clone(&stop), Arc::clone(&max_fds));
        tokio::spawn(async move {
            let fresh = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(5))
                .build()?;
            let (mut lat, mut failures) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match fresh.get(format!("{url}/healthz")).send().await {
                    Ok(r) if r.status().is_success() => lat.push(t.elapsed()),
                    _ => failures += 1,
                }
                max_fds.fetch_max(open_fds(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, anyhow::Error>((lat, failures))
        })
    };

    let started = Instant::now();
    let addr = kbs.url.trim_start_matches("http://").to_owned();
    let opened: Vec<_> = futures::stream::iter(0..args.sockets)
        .map(|_| TcpStream::connect(addr.clone()))
        .buffer_unordered(256)
        .collect()
        .await;
    let flood_took = started.elapsed();
    let connect_errors = opened.iter().filter(|r| r.is_err()).count();
    let held: Vec<TcpStream> = opened.into_iter().filter_map(Result::ok).collect();
    println!(
        "opened {} silent sockets in {:.1} s ({connect_errors} connect errors)",
        held.len(),
        flood_took.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let t = Instant::now();
    let second = tunnel_guest(&kbs.url, 1).await;
    let second_took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut lat, failures) = probe.await??;
    lat.sort();

    let metrics = reqwest::get(format!("{}/metrics", kbs.url))
        .await?
        .text()
        .await?;
    let metric = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "/healthz during {:.0} s: {} answered, {failures} failed, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        started.elapsed().as_secs_f64(),
        lat.len(),
        percentile(&lat, 50.0).as_secs_f64() * 1e3,
        percentile(&lat, 99.0).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "kbs descriptors: at most {} (now {}), RSS {:.1} MiB at start, {:.1} MiB now",
        max_fds.load(Ordering::Relaxed),
        open_fds(pid),
        rss_start as f64 / 1024.0,
        kbs.rss_kib() as f64 / 1024.0
    );
    println!("{}", metric("kbs_connections_open"));
    println!("{}", metric("kbs_connections_evicted_total"));
    println!(
        "tunnel opened before the flood still up: {}; a new guest attested and connected during it: {} ({:.0} ms)",
        !first.served.is_finished(),
        match &second {
            Ok(g) => (!g.served.is_finished()).to_string(),
            Err(e) => format!("no: {e:#}"),
        },
        second_took.as_secs_f64() * 1e3
    );
    drop(held);
    Ok(())
}
