//! Real processes for the tests: the `kbs` binary of this checkout on a config file, and
//! the upstream-style external plugin (`src/bin/upstream_plugin.rs`), each started on a
//! free port and killed on drop (`kill -9` or SIGTERM when a test asks).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::WAIT;

/// A binary of this checkout, next to the running test executable (`target/<profile>/<name>`;
/// `cargo nextest run --workspace`, the README's test command, builds every package's
/// binaries with the tests). Built here only when it is missing: a nested `cargo build` sees
/// another feature set and environment than the test run's and can rebuild much of the
/// tree, which takes minutes. A partial run (`-p tests`) after a change to the server needs
/// `cargo build --workspace --bins` first, or it tests the binary built before the change.
pub fn built_binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test>-<hash> or target/<profile>/examples/<x> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    if bin.exists() {
        return bin;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    // The variables cargo sets for a test run (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...) are
    // seen by some build scripts (ring's): passing them on would rebuild half the tree in
    // the test and again in the next shell build. Keep only the user's own.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let own = matches!(
            key.as_str(),
            "CARGO_HOME" | "CARGO_INCREMENTAL" | "CARGO_TARGET_DIR" | "CARGO_BUILD_JOBS"
        );
        if (key.starts_with("CARGO_") && !own) || key == "LD_LIBRARY_PATH" {
            command.env_remove(&key);
        }
    }
    let status = command
        .args(["build", "-q", "-p", package, "--bin", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    assert!(bin.exists(), "no {name} binary at {}", bin.display());
    bin
}

/// The real `kbs` binary of this checkout.
pub fn kbs_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| built_binary("server", "kbs")).clone()
}

/// The upstream-style external plugin (`tests/src/bin/upstream_plugin.rs`).
pub fn upstream_plugin_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| built_binary("tests", "upstream_plugin"))
        .clone()
}

/// The `credpush` example plugin (`examples/credpush.rs`), which pushes a credential to
/// guests through the KBS's Guests API.
pub fn credpush_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| built_binary("examples", "credpush"))
        .clone()
}

/// The `credpush` example plugin with `args` (`--listen 127.0.0.1:0` is added); `announced`
/// is the address of its `kbs.plugin.v1` server.
pub async fn spawn_credpush(args: &[&str]) -> Spawned {
    let mut cmd = Command::new(credpush_binary());
    cmd.args(args).args(["--listen", "127.0.0.1:0"]);
    spawn_announcing(cmd, "listening on ").await
}

/// A child process and the address or URL it announced.
pub struct Spawned {
    /// The process (killed on drop).
    pub child: Child,
    /// What it printed after its banner prefix (first word).
    pub announced: String,
}

impl Spawned {
    /// `kill -9`, then reap.
    pub async fn kill_9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM (the graceful stop an orchestrator sends), then reap: the exit status, or an
    /// error when the process is still running after `within`.
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self
            .child
            .id()
            .context("the process has already been reaped")?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("still running {within:?} after SIGTERM"))?
            .context("reaping the process")
    }
}

async fn spawn_announcing(mut cmd: Command, prefix: &str) -> Spawned {
    // With `BENCH_KBS_LOG` set (see `spawn_kbs_with`) its log (stderr) is shown, and so are
    // the lines it prints on stdout, tagged with its pid.
    let echo = std::env::var_os("BENCH_KBS_LOG").is_some();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if echo {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("process starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let announced = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("stdout readable") {
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        }
        panic!("process exited before printing `{prefix}`");
    })
    .await
    .expect("process announces itself in time");
    // Keep draining stdout so the process never blocks on a full pipe.
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("[kbs {pid}] {line}");
            }
        }
    });
    Spawned { child, announced }
}

/// A `kbs` process on 127.0.0.1:0 with `data_dir` and, when given, the config file
/// `config`; `announced` is its base URL.
pub async fn spawn_kbs(data_dir: &Path, config: Option<&Path>) -> Spawned {
    spawn_kbs_on("127.0.0.1:0", data_dir, config).await
}

/// [`spawn_kbs`] on `listen` (a restart on the same address, for example).
pub async fn spawn_kbs_on(listen: &str, data_dir: &Path, config: Option<&Path>) -> Spawned {
    spawn_kbs_with(listen, data_dir, config, &[]).await
}

/// [`spawn_kbs_on`] with more environment variables (`KBS_STORAGE__DATABASE_URL`, ...).
pub async fn spawn_kbs_with(
    listen: &str,
    data_dir: &Path,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> Spawned {
    let mut cmd = Command::new(kbs_binary());
    cmd.args(["--listen", listen, "--data-dir"])
        .arg(data_dir)
        // `BENCH_KBS_LOG=info` (any `RUST_LOG` filter) in a benchmark's environment: the
        // spawned KBS logs at that level and its lines are shown (README, benchmarks).
        .env(
            "RUST_LOG",
            std::env::var("BENCH_KBS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    spawn_announcing(cmd, "Tether KBS listening on ").await
}

/// The upstream-style external plugin on `listen` (`127.0.0.1:0`: a free port), over TLS
/// with `tls` (cert, key) when given; `announced` is its address.
pub async fn spawn_upstream_plugin(listen: &str, tls: Option<(&Path, &Path)>) -> Spawned {
    let mut cmd = Command::new(upstream_plugin_binary());
    cmd.args(["--listen", listen]);
    if let Some((cert, key)) = tls {
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    spawn_announcing(cmd, "listening on ").await
}
