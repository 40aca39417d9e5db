//! A real HAProxy (Debian package `haproxy`) in front of KBS replicas, running
//! `deploy/haproxy.cfg` itself (the file deploy/compose.yaml mounts): only the addresses
//! differ, and that file reads them from the environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::WAIT;

/// The load balancer configuration of the deployment files.
pub fn haproxy_cfg() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg")
}

/// How many replicas deploy/haproxy.cfg names (`TETHER_KBS_1..N`).
pub const HAPROXY_BACKENDS: usize = 3;

/// The `haproxy` binary, if installed.
pub fn haproxy_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// HAProxy on a free loopback port (killed on drop).
pub struct Haproxy {
    /// Base URL of the load balancer.
    pub url: String,
    stats: String,
    _child: Child,
}

impl Haproxy {
    /// Starts `haproxy` with deploy/haproxy.cfg in front of `backends` (`host:port`, exactly
    /// [`HAPROXY_BACKENDS`]); returns once it answers `/readyz` through a replica and every
    /// replica passed its first health check.
    pub async fn start(binary: &std::path::Path, backends: &[String]) -> anyhow::Result<Self> {
        if backends.len() != HAPROXY_BACKENDS {
            bail!(
                "deploy/haproxy.cfg names {HAPROXY_BACKENDS} replicas, got {}",
                backends.len()
            );
        }
        let bind = format!("127.0.0.1:{}", free_port());
        let stats = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(binary);
        cmd.arg("-db")
            .arg("-f")
            .arg(haproxy_cfg())
            .env("TETHER_LB_BIND", &bind)
            .env("TETHER_LB_STATS", &stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (i, b) in backends.iter().enumerate() {
            cmd.env(format!("TETHER_KBS_{}", i + 1), b);
        }
        let mut child = cmd.spawn().context("start haproxy")?;
        let me_url = format!("http://{bind}");
        let http = reqwest::Client::new();
        let ready = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(status) = child.try_wait()? {
                    bail!("haproxy exited with {status}");
                }
                if let Ok(r) = http.get(format!("{me_url}/readyz")).send().await
                    && r.status().is_success()
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match ready {
            Ok(r) => r?,
            Err(_) => bail!("haproxy did not answer within {WAIT:?}"),
        }
        let me = Self {
            url: me_url,
            stats: format!("http://{stats}/stats;csv"),
            _child: child,
        };
        // Until its first health check passed, a server shows `UP 1/2` (assumed up); wait
        // for every replica's first check, so the rotation starts with all of them.
        let checked = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(servers) = me.servers().await
                    && servers.len() == HAPROXY_BACKENDS
                    && servers.values().all(|(_, status)| status == "UP")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if checked.is_err() {
            bail!(
                "not every replica passed haproxy's /readyz check: {:?}",
                me.servers().await?
            );
        }
        Ok(me)
    }

    /// Requests each backend server has been sent so far (the stats page's `stot`), by
    /// server name (`kbs1`, ...), and its status (`UP`, `DOWN`, ...).
    pub async fn servers(&self) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
        let csv = reqwest::get(&self.stats).await?.text().await?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty stats")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, stot, status) = (
            col("pxname").context("pxname")?,
            col("svname").context("svname")?,
            col("stot").context("stot")?,
            col("status").context("status")?,
        );
        let mut out = BTreeMap::new();
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            if f.get(px) == Some(&"kbs_replicas")
                && let Some(name) = f.get(sv).filter(|n| n.starts_with("kbs"))
            {
                let total = f.get(stot).and_then(|s| s.parse().ok()).unwrap_or(0);
                let st = f.get(status).copied().unwrap_or_default().to_owned();
                out.insert((*name).to_owned(), (total, st));
            }
        }
        Ok(out)
    }
}
