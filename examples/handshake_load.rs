//! Handshake load: full RCAR (auth + attest) plus one resource GET per iteration, against a
//! real `kbs` process, at concurrency 1, 2, 4, 8. Prints handshakes/s, p50, p99 and server CPU
//! per handshake, against upstream Trustee's figure on this machine.
//!
//! cargo build --release --bin kbs && cargo run --release -p examples --example handshake_load

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
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    levels: Vec<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.kbs_bin.unwrap_or_else(default_kbs_bin);
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
        "Tether handshake load: auth + attest + 1 resource GET per handshake (sample TEE, EC P-256 key)"
    );
    println!(
        "server idle RSS: {:.1} MiB (target < 20 MiB)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "{:>11} {:>13} {:>9} {:>9} {:>14} {:>14} {:>10}",
        "concurrency",
        "handshakes/s",
        "p50",
        "p99",
        "server CPU/hs",
        "client CPU/hs",
        "vs upstream"
    );
    for &c in &args.levels {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let cpu0 = kbs.cpu_time();
        let client_cpu0 = proc_cpu_time(std::process::id());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..c {
            let url = kbs.url.clone();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = KbsClientBuilder::new(url, Box::new(SampleAttester)).build()?;
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    client.attest().await?;
                    let data = client.get_resource(&path).await?;
                    anyhow::ensure!(data.len() == 32, "unexpected resource size");
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let elapsed = started.elapsed();
        let cpu = kbs.cpu_time().saturating_sub(cpu0);
        let client_cpu = proc_cpu_time(std::process::id()).saturating_sub(client_cpu0);
        lat.sort();
        let n = lat.len().max(1) as f64;
        let rate = lat.len() as f64 / elapsed.as_secs_f64();
        println!(
            "{:>11} {:>13.0} {:>7.2}ms {:>7.2}ms {:>12.0}us {:>12.0}us {:>9.1}x",
            c,
            rate,
            percentile(&lat, 50.0).as_secs_f64() * 1e3,
            percentile(&lat, 99.0).as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / n,
            client_cpu.as_secs_f64() * 1e6 / n,
            rate / UPSTREAM_HANDSHAKES_PER_S
        );
    }
    println!(
        "server RSS after load: {:.1} MiB",
        kbs.rss_kib() as f64 / 1024.0
    );
    println!(
        "baseline: upstream Trustee KBS, same machine, ~{UPSTREAM_HANDSHAKES_PER_S}/s with two streams (docs/operations.md); target >= 2000/s"
    );
    Ok(())
}
