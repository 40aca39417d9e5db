//! The real `kbs` binary as a child process on a fixed loopback port and data directory, so
//! that it can be killed with SIGKILL and started again where it was, as a supervisor does.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;
use tokio::process::{Child, Command};

/// How long a start may take before it counts as failed.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A `kbs` process (killed on drop).
pub struct KbsChild {
    bin: PathBuf,
    data_dir: PathBuf,
    config: Option<PathBuf>,
    port: u16,
    log: String,
    child: Option<Child>,
}

impl KbsChild {
    /// Starts `bin` with `--data-dir data_dir` (and `--config config`) on a free loopback
    /// port; returns once `/readyz` answers. `log` is its `RUST_LOG` (its stderr is this
    /// process's).
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        config: Option<&Path>,
        log: &str,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut me = Self {
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            config: config.map(Path::to_owned),
            port,
            log: log.to_owned(),
            child: None,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its process id (0 while it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).unwrap_or(0)
    }

    /// An admin client with the development admin key of its data directory.
    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        let key = AdminKeyPair::load(&self.data_dir.join("admin.key"))?;
        Ok(AdminClient::new(&self.url(), key, None)?)
    }

    /// SIGKILL, and wait until the process is gone (nothing drains, nothing is flushed).
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port and data directory; returns once `/readyz` answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", &self.log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let started = Instant::now();
        // The port of a killed process can stay taken for a moment.
        loop {
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?;
            match wait_ready(&self.url(), &mut child).await {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) if started.elapsed() < READY_WITHIN => {
                    tracing::debug!(error = %e, "kbs did not start; trying again");
                    let _ = child.kill().await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

async fn wait_ready(url: &str, child: &mut Child) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("kbs exited with {status} before it was ready");
        }
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > READY_WITHIN {
            bail!("kbs did not become ready within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
