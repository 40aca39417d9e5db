//! Shared pieces of the example programs and load tools: run a `kbs` process, measure it, and
//! connect simulated guests to it (the guests themselves come from the test kit, `tests`).

#[path = "hello_plugin.rs"]
pub mod hello_plugin;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;

/// A `kbs` server process started for a measurement, killed on drop.
pub struct KbsProcess {
    child: Child,
    /// Base URL.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl KbsProcess {
    /// Start `bin` on a free loopback port with a fresh data dir; wait until `/readyz` answers.
    pub async fn start(bin: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra_args)
            // `BENCH_KBS_LOG=info` (say) shows the KBS's own log on this process's stderr.
            .env(
                "RUST_LOG",
                std::env::var("BENCH_KBS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build --release --bin kbs`)",
                    bin.display()
                )
            })?;
        let url = format!("http://127.0.0.1:{port}");
        let me = Self {
            child,
            url,
            data_dir,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", me.url)).send().await
                && r.status().is_success()
            {
                return Ok(me);
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("kbs did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An admin client with its development admin key.
    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        let key = AdminKeyPair::load(&self.data_dir.join("admin.key"))?;
        Ok(AdminClient::new(&self.url, key, None)?)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }

    /// User + system CPU time consumed so far.
    pub fn cpu_time(&self) -> Duration {
        proc_cpu_time(self.pid())
    }
}

impl Drop for KbsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, KiB (0 if unreadable).
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process.
pub fn proc_cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Linux reports in USER_HZ, 100 on every mainstream build.
    Duration::from_millis(ticks * 10)
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The release `kbs` binary next to this example's target dir.
pub fn default_kbs_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/examples/<name> -> target/release/kbs
    exe.parent()
        .and_then(Path::parent)
        .map(|p| p.join("kbs"))
        .unwrap_or_else(|| PathBuf::from("target/release/kbs"))
}

/// Runs `fut` to completion on a multi-threaded tokio runtime (a load tool's `main`).
pub fn block_on_multi_thread<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

/// A simulated guest of a load tool, attested (sample TEE) and ready to open its tunnel.
pub struct AttestedGuest {
    /// Its guest id, `sim-00042`.
    pub id: String,
    /// Its TEE key.
    pub key: TeeKeyPair,
    /// Its attestation token.
    pub token: String,
}

impl AttestedGuest {
    /// Attests guest `sim-<index>` labelled `labels` at the KBS at `url`.
    pub async fn attest(url: &str, index: usize, labels: &[(&str, &str)]) -> anyhow::Result<Self> {
        let id = format!("sim-{index:05}");
        let key = TeeKeyPair::new_ec();
        let init = tests::init_data(&id, labels);
        let token = tests::attest(url, None, &key, Some(&init)).await?;
        Ok(Self { id, key, token })
    }

    /// What it says of itself in its Proof.
    pub fn info(&self) -> rpc_defs::GuestInfo {
        tests::guest_info(&self.id, "sim", &["resources"])
    }
}

/// Runs `connect(index)` for guests `0..count`, `concurrency` at a time, and returns what they
/// returned (in completion order); fails if any fails.
pub async fn connect_fleet<T, F, Fut>(
    count: usize,
    concurrency: usize,
    connect: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    futures::stream::iter(0..count)
        .map(connect)
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("a simulated guest failed to connect")
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
