//! Probe benchmark: a real `kbs` process, N simulated guests in this process (each attests
//! for real with the sample TEE and holds a real tunnel over loopback), then one selector
//! call `POST /kbs/v0/probes` that probes all of them. Reports completion time, outcomes and
//! the KBS's CPU time for the call (from /proc).
//!
//! ```sh
//! cargo build --release --bin kbs
//! cargo run --release -p examples --example probe_bench -- --guests 10000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use examples::{KbsProcess, default_kbs_bin, proc_cpu_time};
use futures::StreamExt;
use guest_daemon::{evidence::SampleAttester, rcar::KbsClientBuilder, tee_key::TeeKeyPair};
use kbs_core::admin_key::AdminKeyPair;
use rpc_defs::{
    Applied, CredentialBundle, GuestError, GuestInfo, GuestService, HealthReport, HeldResource,
    Installed, ProbeKind, ProbeReport, RuntimeReport, SealedResource,
};
use serde_bytes::ByteBuf;
use server::admin_client::{AdminClient, RequestBody};
use tarpc::context::Context;

#[derive(Parser, Debug)]
struct Args {
    /// Simulated guests.
    #[arg(long, default_value_t = 10_000)]
    guests: usize,
    /// Concurrency of the selector probe calls (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    concurrency: Vec<usize>,
    /// Guests attesting and connecting at once during set-up.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The kbs binary.
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
}

#[derive(Clone)]
struct SimGuest {
    index: usize,
}

impl GuestService for SimGuest {
    async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
        payload
    }

    async fn install_credentials(
        self,
        _: Context,
        b: CredentialBundle,
    ) -> Result<Installed, GuestError> {
        Err(GuestError::Unsupported(b.id))
    }

    async fn apply_resource(self, _: Context, r: SealedResource) -> Result<Applied, GuestError> {
        Err(GuestError::Unsupported(r.uri))
    }

    async fn probe(self, _: Context, _: ProbeKind) -> Result<ProbeReport, GuestError> {
        Ok(ProbeReport {
            health: Some(HealthReport {
                healthy: true,
                problems: Vec::new(),
            }),
            resources: Some(vec![HeldResource {
                uri: "default/key/tls".into(),
                version: 1 + (self.index % 3) as u64,
                sha256: "ab".repeat(32),
                applied_at: 1_760_000_000,
            }]),
            runtime: Some(RuntimeReport {
                uptime_s: 60,
                rss_bytes: 8 << 20,
                daemon_version: "sim".into(),
                open_tunnels: 1,
            }),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn connect(url: String, index: usize) -> anyhow::Result<tunnel::TunnelSession> {
    let id = format!("sim-{index:05}");
    let init = format!(
        "[tether]\nguest_id = \"{id}\"\n\n[tether.labels]\napp = \"bench\"\nshard = \"s{}\"\n",
        index % 10
    );
    let key = TeeKeyPair::new_ec();
    let token = KbsClientBuilder::new(url.clone(), Box::new(SampleAttester))
        .key(key.clone())
        .init_data(&init)
        .build()?
        .attest()
        .await?;
    let ws = format!(
        "ws{}/kbs/v0/tunnel",
        url.strip_prefix("http").unwrap_or(&url)
    );
    let unseal = move |jwe: &[u8]| {
        key.open_json(jwe)
            .map(|p| p.to_vec())
            .map_err(|e| e.to_string())
    };
    let info = GuestInfo {
        instance_id: id.clone(),
        daemon_version: "sim".into(),
        services: vec!["resources".into()],
    };
    let (session, serve) = tunnel::connect_and_serve(
        &tunnel::GuestTunnelConfig::new(ws),
        &token,
        info,
        unseal,
        SimGuest { index },
    )
    .await?;
    tokio::spawn(serve);
    Ok(session)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = args.kbs_bin.clone().unwrap_or_else(default_kbs_bin);
    let kbs = KbsProcess::start(&bin, &[]).await?;
    let key = AdminKeyPair::load(&kbs.data_dir.join("admin.key"))?;
    let admin = Arc::new(AdminClient::new(&kbs.url, key, None)?);

    let started = Instant::now();
    let url = kbs.url.clone();
    let sessions: Vec<tunnel::TunnelSession> = futures::stream::iter(0..args.guests)
        .map(|i| connect(url.clone(), i))
        .buffer_unordered(args.connect_concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("a simulated guest failed to connect")?;
    let setup = started.elapsed();
    println!(
        "{} guests attested and connected in {:.1} s; KBS RSS {} MiB",
        sessions.len(),
        setup.as_secs_f64(),
        kbs.rss_kib() / 1024
    );
    // Wait until the KBS lists them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin
            .send(
                reqwest::Method::GET,
                "/kbs/v0/admin/guests?limit=1&selector=app%3Dbench",
                None,
            )
            .await?;
        let live = v["known"].as_u64().unwrap_or(0) as usize;
        if live >= args.guests {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {live} guests known");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!(
        "\n{:>11} {:>6} {:>10} {:>12} {:>14} {:>10}",
        "concurrency", "kind", "selected", "completion", "KBS CPU", "outcomes"
    );
    for &c in &args.concurrency {
        for kind in ["health", "all"] {
            let cpu0 = proc_cpu_time(kbs.pid());
            let started = Instant::now();
            let body = serde_json::json!({
                "selector": "app=bench",
                "kind": kind,
                "concurrency": c,
                "deadline_ms": 120_000,
            });
            let v = admin
                .send(
                    reqwest::Method::POST,
                    "/kbs/v0/probes",
                    Some(RequestBody::Json(body)),
                )
                .await?;
            let wall = started.elapsed();
            let cpu = proc_cpu_time(kbs.pid()).saturating_sub(cpu0);
            println!(
                "{:>11} {:>6} {:>10} {:>10.0}ms {:>9.0}ms ({:.0}%) {}",
                c,
                kind,
                v["selected"],
                wall.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e3,
                cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
                v["summary"]
            );
        }
    }
    let drift = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/guests?connected=any&stale=default/key/tls&limit=1",
            None,
        )
        .await?;
    println!(
        "\n(the KBS holds no default/key/tls, so no guest is stale: {} listed)",
        drift["guests"].as_array().map_or(0, Vec::len)
    );
    drop(sessions);
    Ok(())
}
