//! Shared pieces of the example programs and load tools: run a `kbs` process and measure it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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
