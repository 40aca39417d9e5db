//! Fleet simulator: one real `kbs` process and several guest-simulator processes (this example
//! re-executed with `--child`), guests spread over 127.0.0.x source addresses. Each simulated
//! guest attests for real (RCAR, sample TEE, init-data naming its own `[tether] guest_id`),
//! opens an authenticated tunnel and answers `GuestService` with a trivial in-process service.
//!
//! Measures (each process here may hold at most 20,000 open files, see docs/operations.md, "Limits of the host"):
//! 1. KBS memory per idle tunnel at 1k, 5k and 19k tunnels, plain and TLS: RSS growth while
//!    the tunnels open, over the number opened. Guests attest first and the RSS is read again
//!    before their tunnels open, so RCAR session state is not counted as tunnel memory.
//! 2. Reconnect storm: N connected guests, `kill -9` of the KBS, restart on the same port and
//!    data directory; time until all are back and the peak handshake rate.
//! 3. Guest daemon footprint: idle RSS of a real `guest-daemon run` holding its tunnel, and
//!    the size of its stripped binary (the `guest` profile build when present).
//!
//! ```sh
//! cargo build --release --bin kbs --bin guest-daemon
//! cargo run --release -p examples --example fleet
//! cargo run --release -p examples --example fleet -- --counts 1000 --storm 2000 --procs 2
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use examples::proc_rss_kib;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;
use tests::{FakeKbsOptions, FakeTunnelKbs, StubGuest, fake_token, fake_unseal, unseal_with};
use tokio::sync::watch;
use tunnel::{Backoff, GuestTunnelConfig, ReconnectPolicy};

/// The raw WebSocket floor per idle connection with a 4 KiB read buffer (docs/operations.md, "Raw WebSocket floor"); the
/// tunnel's own read buffer is 1 KiB, so a tunnel-only KBS measures below it.
const FLOOR_PLAIN_KIB: f64 = 6.8;
const FLOOR_TLS_KIB: f64 = 14.2;
const TARGET_PLAIN_KIB: f64 = 9.0;
const TARGET_TLS_KIB: f64 = 18.5;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Run as a guest-simulator child (internal).
    #[arg(long, hide = true)]
    child: bool,
    /// Child: KBS base URL.
    #[arg(long, hide = true)]
    kbs_url: Option<String>,
    /// Child: CA file for a TLS KBS.
    #[arg(long, hide = true)]
    ca_file: Option<PathBuf>,
    /// Child: source address of its tunnels.
    #[arg(long, hide = true)]
    src: Option<Ipv4Addr>,
    /// Child: guest id prefix.
    #[arg(long, hide = true, default_value = "g")]
    prefix: String,
    /// Child: skip RCAR, use the tunnel-only KBS's fake token and challenge.
    #[arg(long, hide = true)]
    fake_attest: bool,
    /// Run as the tunnel-only KBS (internal).
    #[arg(long, hide = true)]
    child_kbs: bool,
    /// Tunnel-only KBS: port to listen on.
    #[arg(long, hide = true, default_value_t = 0)]
    port: u16,
    /// Tunnel-only KBS: serve TLS with a self-signed certificate written under this directory.
    #[arg(long, hide = true)]
    tls_dir: Option<PathBuf>,

    /// Which KBS: `binary` (the release `kbs`, full RCAR, every plugin and index it keeps
    /// per guest) or `tunnel-only` (this example's own process with nothing but the tunnel
    /// route: fake token and challenge, the tunnel crate's cost alone).
    #[arg(long, default_value = "binary")]
    kbs: String,

    /// Path of the release `kbs` binary (default: next to this example's target dir).
    #[arg(long)]
    kbs_bin: Option<PathBuf>,
    /// Path of the release `guest-daemon` binary (default: next to `kbs`).
    #[arg(long)]
    guest_daemon_bin: Option<PathBuf>,
    /// Tunnel counts at which the KBS memory is measured.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,19000")]
    counts: Vec<usize>,
    /// Guest-simulator processes.
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Guests in the reconnect storm (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    storm: usize,
    /// Transports measured for memory: plain, tls or both.
    #[arg(long, value_delimiter = ',', default_value = "plain,tls")]
    modes: Vec<String>,
    /// Attestations + tunnel opens at once per child.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Log level of the KBS (its log goes to /dev/null; the level decides the spans it keeps).
    #[arg(long, default_value = "info")]
    kbs_log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.child_kbs {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(tunnel_only_kbs(args));
    }
    if args.child {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(child_main(args));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(parent_main(args))
}

// ---------------------------------------------------------------------------------------------
// Child: simulated guests.

#[derive(Default)]
struct ChildStats {
    attested: AtomicU64,
    connected: AtomicU64,
    opens: AtomicU64,
    errors: AtomicU64,
}

struct ChildCtx {
    kbs_url: String,
    ca_file: Option<PathBuf>,
    tunnel: GuestTunnelConfig,
    prefix: String,
    fake_attest: bool,
    stats: ChildStats,
    /// Guests with an index below this may open their tunnel.
    gate: watch::Receiver<usize>,
    /// Attestations and first tunnel opens at once.
    slots: tokio::sync::Semaphore,
}

async fn child_main(args: Args) -> anyhow::Result<()> {
    let kbs_url = args.kbs_url.context("--kbs-url")?;
    let mut tunnel = GuestTunnelConfig::new(tests::tunnel_url(&kbs_url));
    if let Some(ca) = &args.ca_file {
        tunnel = tunnel.with_tls(tests::tls_client_config(ca));
    }
    tunnel.local_addr = args.src.map(IpAddr::V4);
    let (gate_tx, gate) = watch::channel(0usize);
    let ctx = Arc::new(ChildCtx {
        kbs_url,
        ca_file: args.ca_file,
        tunnel,
        prefix: args.prefix,
        fake_attest: args.fake_attest,
        stats: ChildStats::default(),
        gate,
        slots: tokio::sync::Semaphore::new(args.concurrency.max(1)),
    });

    // Report every 100 ms on stdout: attested connected opens errors.
    let reporter = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let s = &ctx.stats;
                println!(
                    "stat {} {} {} {}",
                    s.attested.load(Ordering::Relaxed),
                    s.connected.load(Ordering::Relaxed),
                    s.opens.load(Ordering::Relaxed),
                    s.errors.load(Ordering::Relaxed)
                );
            }
        })
    };

    // Commands on stdin: `attest N` (have N guests, attested), `open N` (let the first N open
    // their tunnels), `quit`.
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut spawned = 0usize;
    while let Some(line) = lines.recv().await {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|n| n.parse::<usize>().ok()),
        ) {
            (Some("attest"), Some(n)) => {
                while spawned < n {
                    tokio::spawn(guest(ctx.clone(), spawned));
                    spawned += 1;
                }
            }
            (Some("open"), Some(n)) => {
                gate_tx.send_replace(n);
            }
            _ => break,
        }
    }
    reporter.abort();
    Ok(())
}

async fn attest(ctx: &ChildCtx, guest_id: &str, key: &TeeKeyPair) -> anyhow::Result<String> {
    if ctx.fake_attest {
        return Ok(fake_token(guest_id));
    }
    let init_data = tests::init_data(guest_id, &[("fleet", "sim")]);
    tests::attest(&ctx.kbs_url, ctx.ca_file.as_deref(), key, Some(&init_data)).await
}

/// One simulated guest: attest, wait for the gate, then hold a tunnel forever, reconnecting
/// with the daemon's backoff (full jitter) and re-attesting when the KBS asks for it.
async fn guest(ctx: Arc<ChildCtx>, index: usize) {
    let guest_id = format!("{}-{index}", ctx.prefix);
    let key = TeeKeyPair::new_ec();
    let mut backoff = Backoff::new(ReconnectPolicy::default());
    let mut token = None;
    let mut first = true;
    loop {
        let permit = if first {
            ctx.slots.acquire().await.ok()
        } else {
            None
        };
        let jwt = match &token {
            Some(jwt) => Ok(jwt),
            None => match attest(&ctx, &guest_id, &key).await {
                Ok(jwt) => {
                    if first {
                        ctx.stats.attested.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(token.insert(jwt) as &String)
                }
                Err(e) => Err(e),
            },
        };
        let jwt = match jwt {
            Ok(jwt) => jwt.clone(),
            Err(e) => {
                ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                if ctx.stats.errors.load(Ordering::Relaxed) < 5 {
                    eprintln!("{guest_id}: attestation failed: {e:#}");
                }
                drop(permit);
                let delay = backoff.next_delay(&mut rand::thread_rng());
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if first {
            drop(permit);
            let mut gate = ctx.gate.clone();
            if gate.wait_for(|open| *open > index).await.is_err() {
                return;
            }
        }
        let permit = if first {
            ctx.slots.acquire().await.ok()
        } else {
            None
        };
        let info = tests::guest_info(&guest_id, "fleet-sim", &[]);
        type Unseal = Box<dyn FnOnce(&[u8]) -> Result<Vec<u8>, String> + Send>;
        let unseal: Unseal = if ctx.fake_attest {
            Box::new(fake_unseal)
        } else {
            Box::new(unseal_with(&key))
        };
        let delay = match tunnel::connect(&ctx.tunnel, &jwt, info, unseal).await {
            Ok(tunnel) => {
                drop(permit);
                first = false;
                ctx.stats.opens.fetch_add(1, Ordering::Relaxed);
                ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
                let closed = tunnel.serve(StubGuest::new()).await;
                ctx.stats.connected.fetch_sub(1, Ordering::Relaxed);
                if closed.needs_reattest() {
                    token = None;
                }
                backoff.after_close(&closed, &mut rand::thread_rng())
            }
            Err(e) => {
                drop(permit);
                ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                if e.needs_reattest() {
                    token = None;
                }
                backoff.next_delay(&mut rand::thread_rng())
            }
        };
        tokio::time::sleep(delay).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tunnel-only KBS: the test kit's fake KBS (the tunnel route and nothing else) in its own
// process.

async fn tunnel_only_kbs(args: Args) -> anyhow::Result<()> {
    let kbs = FakeTunnelKbs::start(FakeKbsOptions {
        listen: (Ipv4Addr::LOCALHOST, args.port).into(),
        tls: args.tls_dir.is_some(),
        print_future_size: std::env::var_os("FLEET_PRINT_SIZES").is_some(),
        ..FakeKbsOptions::default()
    })
    .await?;
    if let (Some(dir), Some(pem)) = (&args.tls_dir, &kbs.cert_pem) {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("cert.pem"), pem)?;
    }
    kbs.serve_forever().await
}

// ---------------------------------------------------------------------------------------------
// Parent: the KBS process, the children, the measurements.

/// A `kbs` process on a fixed port and data directory, so it can be killed and restarted.
struct Kbs {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    tls: bool,
    log: String,
    /// The tunnel-only KBS (this example's own process) instead of the `kbs` binary.
    tunnel_only: bool,
    child: Option<Child>,
}

impl Kbs {
    async fn start(bin: &Path, tls: bool, args: &Args) -> anyhow::Result<Self> {
        let log = args.kbs_log.as_str();
        let tunnel_only = match args.kbs.as_str() {
            "binary" => false,
            "tunnel-only" => true,
            other => bail!("unknown --kbs {other:?} (binary, tunnel-only)"),
        };
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("kbs.toml"),
            "[attestation]\ntoken_ttl = \"2h\"\n",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut me = Self {
            bin: bin.to_owned(),
            port,
            dir,
            tls,
            log: log.to_owned(),
            tunnel_only,
            child: None,
        };
        me.spawn().await?;
        if tunnel_only {
            return Ok(me);
        }
        let admin = AdminClient::new(
            &me.url(),
            AdminKeyPair::load(&me.data_dir().join("admin.key"))?,
            me.ca_file().as_deref(),
        )?;
        admin
            .set_policy(include_str!("policies/allow-sample.rego"))
            .await?;
        Ok(me)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn ca_file(&self) -> Option<PathBuf> {
        self.tls
            .then(|| self.data_dir().join("tls").join("cert.pem"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = if self.tunnel_only {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("--child-kbs")
                .arg("--port")
                .arg(self.port.to_string());
            if self.tls {
                cmd.arg("--tls-dir").arg(self.data_dir().join("tls"));
            }
            cmd
        } else {
            let mut cmd = Command::new(&self.bin);
            cmd.arg("--config")
                .arg(self.dir.path().join("kbs.toml"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--data-dir")
                .arg(self.data_dir());
            if self.tls {
                cmd.arg("--tls-self-signed");
            }
            cmd
        };
        cmd.env("RUST_LOG", &self.log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release --bin kbs`)",
                self.bin.display()
            )
        })?);
        let start = Instant::now();
        loop {
            let ready = match self.ca_file().filter(|ca| ca.exists()) {
                Some(ca) => http_client(Some(&ca))?,
                None if self.tls => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                None => http_client(None)?,
            }
            .get(format!("{}/readyz", self.url()))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("kbs did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Kbs {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn http_client(ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(2));
    if let Some(ca) = ca {
        for cert in reqwest::Certificate::from_pem_bundle(&std::fs::read(ca)?)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

/// Figures a child last reported.
#[derive(Clone, Copy, Debug, Default)]
struct Stat {
    attested: u64,
    connected: u64,
    opens: u64,
    errors: u64,
}

struct Sim {
    child: Child,
    stdin: ChildStdin,
    stat: Arc<Mutex<Stat>>,
}

impl Sim {
    fn spawn(kbs: &Kbs, index: usize, args: &Args) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--child")
            .arg("--kbs-url")
            .arg(kbs.url())
            .arg("--src")
            .arg(format!("127.0.0.{}", 10 + index))
            .arg("--prefix")
            .arg(format!("p{index}"))
            .arg("--concurrency")
            .arg(args.concurrency.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(ca) = kbs.ca_file() {
            cmd.arg("--ca-file").arg(ca);
        }
        if kbs.tunnel_only {
            cmd.arg("--fake-attest");
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stat = Arc::new(Mutex::new(Stat::default()));
        let sink = stat.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let n: Vec<u64> = line
                    .strip_prefix("stat ")
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if let ([attested, connected, opens, errors], Ok(mut s)) = (&n[..], sink.lock()) {
                    *s = Stat {
                        attested: *attested,
                        connected: *connected,
                        opens: *opens,
                        errors: *errors,
                    };
                }
            }
        });
        Ok(Self { child, stdin, stat })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn stat(&self) -> Stat {
        self.stat.lock().map(|s| *s).unwrap_or_default()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.send("quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn total(sims: &[Sim]) -> Stat {
    sims.iter()
        .map(Sim::stat)
        .fold(Stat::default(), |a, b| Stat {
            attested: a.attested + b.attested,
            connected: a.connected + b.connected,
            opens: a.opens + b.opens,
            errors: a.errors + b.errors,
        })
}

/// Splits `n` guests over the children.
fn shares(n: usize, procs: usize) -> Vec<usize> {
    (0..procs)
        .map(|i| n / procs + usize::from(i < n % procs))
        .collect()
}

async fn wait_until(
    sims: &[Sim],
    what: &str,
    limit: Duration,
    done: impl Fn(&Stat) -> bool,
) -> anyhow::Result<Stat> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let t = total(sims);
        if done(&t) {
            return Ok(t);
        }
        if start.elapsed() > limit {
            bail!("{what}: not done after {limit:?} ({t:?})");
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("   ... {what}: {t:?}");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the RSS to settle (two reads 500 ms apart within 1%).
async fn settled_rss(kbs: &Kbs) -> u64 {
    let mut last = kbs.rss_kib();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = kbs.rss_kib();
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

async fn memory_run(bin: &Path, tls: bool, args: &Args) -> anyhow::Result<()> {
    let mode = if tls { "TLS" } else { "plain" };
    let (floor, target) = if tls {
        (FLOOR_TLS_KIB, TARGET_TLS_KIB)
    } else {
        (FLOOR_PLAIN_KIB, TARGET_PLAIN_KIB)
    };
    let kbs = Kbs::start(bin, tls, args).await?;
    let mut sims = (0..args.procs)
        .map(|i| Sim::spawn(&kbs, i, args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let idle = settled_rss(&kbs).await;
    println!(
        "\n1. idle tunnels over {mode} WebSocket, {} KBS: pid {}, idle RSS {:.1} MiB, {} guest processes",
        if kbs.tunnel_only {
            "tunnel-only"
        } else {
            "full `kbs`"
        },
        kbs.pid(),
        idle as f64 / 1024.0,
        args.procs
    );
    println!(
        "   {:>7} {:>15} {:>15} {:>13} {:>10} {:>8}",
        "tunnels", "RSS attested", "RSS tunnels up", "KiB / tunnel", "floor", "target"
    );
    let mut tunnel_growth_kib = 0u64;
    for &n in &args.counts {
        let started = Instant::now();
        for (sim, share) in sims.iter_mut().zip(shares(n, args.procs)) {
            sim.send(&format!("attest {share}"))?;
        }
        wait_until(&sims, "attest", Duration::from_secs(600), |t| {
            t.attested as usize >= n
        })
        .await?;
        let attest_secs = started.elapsed().as_secs_f64();
        let before = settled_rss(&kbs).await;
        let started = Instant::now();
        for (sim, share) in sims.iter_mut().zip(shares(n, args.procs)) {
            sim.send(&format!("open {share}"))?;
        }
        let t = wait_until(&sims, "open", Duration::from_secs(600), |t| {
            t.connected as usize >= n
        })
        .await?;
        let open_secs = started.elapsed().as_secs_f64();
        let after = settled_rss(&kbs).await;
        tunnel_growth_kib += after.saturating_sub(before);
        let per = tunnel_growth_kib as f64 / n as f64;
        println!(
            "   {:>7} {:>11.1} MiB {:>11.1} MiB {:>13.2} {:>6.1} KiB {:>4.1} KiB  {}   (attest {:.1} s, open {:.1} s, errors {})",
            n,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            per,
            floor,
            target,
            if per <= target { "met" } else { "NOT met" },
            attest_secs,
            open_secs,
            t.errors
        );
    }
    drop(sims);
    Ok(())
}

async fn storm_run(bin: &Path, args: &Args) -> anyhow::Result<()> {
    let n = args.storm;
    let mut kbs = Kbs::start(bin, false, args).await?;
    let mut sims = (0..args.procs)
        .map(|i| Sim::spawn(&kbs, i, args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (sim, share) in sims.iter_mut().zip(shares(n, args.procs)) {
        sim.send(&format!("attest {share}"))?;
        sim.send(&format!("open {share}"))?;
    }
    wait_until(&sims, "storm setup", Duration::from_secs(900), |t| {
        t.connected as usize >= n
    })
    .await?;
    let opens_before = total(&sims).opens;
    println!("\n2. reconnect storm: {n} guests connected (plain); kill -9 of the KBS, restart");
    let killed = Instant::now();
    kbs.kill9();
    kbs.spawn().await?;
    let ready = killed.elapsed();
    // Sample every 100 ms; the peak rate is the most opens in any 1 s window.
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let limit = Duration::from_secs(300);
    loop {
        let t = total(&sims);
        let reopened = t.opens.saturating_sub(opens_before);
        samples.push((killed.elapsed(), reopened));
        if t.connected as usize >= n && reopened as usize >= n {
            break;
        }
        if killed.elapsed() > limit {
            bail!("storm: only {} of {n} back after {limit:?}", t.connected);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_back = killed.elapsed();
    // Opens in the 1 s window ending at each sample (nothing was reopened before the kill).
    let mut peak = 0u64;
    for (i, &(at, count)) in samples.iter().enumerate() {
        let c0 = samples[..i]
            .iter()
            .rev()
            .find(|(t, _)| at.saturating_sub(*t) >= Duration::from_secs(1))
            .map_or(0, |&(_, c)| c);
        peak = peak.max(count - c0);
    }
    let mean = n as f64 / (all_back - ready).as_secs_f64().max(1e-3);
    println!(
        "   KBS ready again {:.2} s after the kill; all {n} back {:.2} s after the kill ({:.2} s after ready)",
        ready.as_secs_f64(),
        all_back.as_secs_f64(),
        (all_back - ready).as_secs_f64()
    );
    println!(
        "   peak handshake rate {peak}/s (1 s window), mean {mean:.0}/s; backoff: full jitter, 0.5 s doubling to 30 s"
    );
    drop(sims);
    Ok(())
}

async fn daemon_run(kbs_bin: &Path, daemon_bin: &Path, args: &Args) -> anyhow::Result<()> {
    let binary = Args {
        kbs: "binary".into(),
        ..args.clone()
    };
    let kbs = Kbs::start(kbs_bin, false, &binary).await?;
    let dir = tempfile::tempdir()?;
    let init = dir.path().join("init-data.toml");
    std::fs::write(&init, "[tether]\nguest_id = \"footprint\"\n")?;
    let mut daemon = Command::new(daemon_bin)
        .arg("run")
        .arg("--tee")
        .arg("sample")
        .arg("--kbs-url")
        .arg(kbs.url())
        .arg("--init-data")
        .arg(&init)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release --bin guest-daemon`)",
                daemon_bin.display()
            )
        })?;
    let admin = AdminClient::new(
        &kbs.url(),
        AdminKeyPair::load(&kbs.data_dir().join("admin.key"))?,
        None,
    )?;
    let start = Instant::now();
    loop {
        let guests = admin.list_guests().await.unwrap_or_default();
        if !guests.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = daemon.kill();
            bail!("the guest daemon did not connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let it settle, and have the KBS call it once (a ping) so the RPC path is warm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = admin.ping_guest("footprint").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = proc_rss_kib(daemon.id());
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (anon, file) = (field("RssAnon:"), field("RssFile:"));
    let size = std::fs::metadata(daemon_bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "\n3. guest daemon footprint (`{} run`, connected, idle)",
        daemon_bin.display()
    );
    println!(
        "   idle RSS {:.1} MiB = {:.1} MiB anonymous + {:.1} MiB mapped binary and libraries (target < 10 MiB: {}); binary {:.1} MiB (stripped)",
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0,
        if rss < 10 * 1024 { "met" } else { "NOT met" },
        size as f64 / (1024.0 * 1024.0)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    Ok(())
}

async fn parent_main(args: Args) -> anyhow::Result<()> {
    let kbs_bin = args
        .kbs_bin
        .clone()
        .unwrap_or_else(examples::default_kbs_bin);
    // The size-optimised build (`cargo build --profile guest`) when there is one: it is what
    // a guest image ships; else the release build next to `kbs`.
    let daemon_bin = args.guest_daemon_bin.clone().unwrap_or_else(|| {
        let release = kbs_bin
            .parent()
            .map(|p| p.join("guest-daemon"))
            .unwrap_or_else(|| PathBuf::from("target/release/guest-daemon"));
        let guest = kbs_bin
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("guest/guest-daemon"));
        guest.filter(|p| p.exists()).unwrap_or(release)
    });
    let max = args.counts.iter().copied().max().unwrap_or(0);
    if max.div_ceil(args.procs.max(1)) > 19_000 || args.storm.div_ceil(args.procs.max(1)) > 19_000 {
        bail!("more than 19,000 guests per process: raise --procs (20,000 open files each)");
    }
    println!(
        "fleet: KBS {} ({}), {} guest processes (sources 127.0.0.10..), KBS log level {}",
        args.kbs,
        kbs_bin.display(),
        args.procs,
        args.kbs_log
    );
    for mode in &args.modes {
        match mode.as_str() {
            "plain" => memory_run(&kbs_bin, false, &args).await?,
            "tls" => memory_run(&kbs_bin, true, &args).await?,
            other => bail!("unknown mode {other:?} (plain, tls)"),
        }
    }
    if args.storm > 0 {
        storm_run(&kbs_bin, &args).await?;
    }
    if daemon_bin.exists() {
        daemon_run(&kbs_bin, &daemon_bin, &args).await?;
    } else {
        println!(
            "\n3. guest daemon footprint: {} not built (cargo build --profile guest --bin guest-daemon)",
            daemon_bin.display()
        );
    }
    Ok(())
}
