//! The post-rotation hook: a shell command run after a new resource version is
//! committed, so a workload can reload (`systemctl reload`, `kill -HUP`, ...).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Default time a hook may run before it is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Status reported when the hook ran out of time and was killed (as timeout(1)).
pub const HOOK_TIMED_OUT: i32 = 124;
/// Status reported when `sh` could not be started at all.
pub const HOOK_NOT_STARTED: i32 = -1;
/// How long to wait for a killed hook to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A command run as `sh -c <command>` with `TETHER_RESOURCE`, `TETHER_VERSION`
/// and `TETHER_FILE` in its environment.
#[derive(Debug, Clone)]
pub struct PostApplyHook {
    command: String,
    timeout: Duration,
}

impl PostApplyHook {
    /// A hook running `command` with the default 30 s timeout.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }

    /// The same hook with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The shell command.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Run the hook for `version` of `resource` (stable path `file`) and return
    /// its exit status: the exit code, 128 + signal number if a signal ended
    /// it, [`HOOK_TIMED_OUT`] or [`HOOK_NOT_STARTED`].
    ///
    /// The hook's stdout and stderr go to the daemon's. It runs in a process
    /// group of its own, and on timeout the whole group is killed: `sh` and
    /// whatever it started (a process that left the group on purpose, with
    /// `setsid` say, is not the hook's any more). So is it when this future is dropped
    /// (the daemon shutting down) while the hook still runs.
    pub async fn run(&self, resource: &str, version: u64, file: &Path) -> i32 {
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("TETHER_RESOURCE", resource)
            .env("TETHER_VERSION", version.to_string())
            .env("TETHER_FILE", file)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => HookProcess(child),
            Err(e) => {
                tracing::error!(resource, version, error = %e, "cannot start hook");
                return HOOK_NOT_STARTED;
            }
        };
        match tokio::time::timeout(self.timeout, child.0.wait()).await {
            Ok(Ok(status)) => exit_code(status),
            Ok(Err(e)) => {
                tracing::error!(resource, version, error = %e, "cannot wait for hook");
                HOOK_NOT_STARTED
            }
            Err(_) => {
                tracing::warn!(resource, version, timeout = ?self.timeout, "hook timed out; killing its process group");
                kill_group(&mut child.0);
                let _ = tokio::time::timeout(REAP_TIMEOUT, child.0.wait()).await;
                HOOK_TIMED_OUT
            }
        }
    }
}

/// A running hook; dropped before it exits, its process group is killed (tokio's
/// `kill_on_drop` would only kill `sh`).
struct HookProcess(tokio::process::Child);

impl Drop for HookProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            kill_group(&mut self.0);
        }
    }
}

/// Kills the hook's process group (its id is the hook's pid), or the hook alone when the
/// group is already gone.
fn kill_group(child: &mut tokio::process::Child) {
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(group) = group
        && let Err(e) = rustix::process::kill_process_group(group, rustix::process::Signal::KILL)
    {
        tracing::warn!(error = %e, "cannot kill the hook's process group");
    }
    if let Err(e) = child.start_kill() {
        tracing::debug!(error = %e, "hook already gone");
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(HOOK_NOT_STARTED)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_exit_status_and_sees_its_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("env");
        let hook = PostApplyHook::new(format!(
            "echo \"$TETHER_RESOURCE $TETHER_VERSION $TETHER_FILE\" > '{}'; exit 3",
            out.display()
        ));
        let status = hook.run("r/t/x", 7, Path::new("/state/r/t/x")).await;
        assert_eq!(status, 3);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "r/t/x 7 /state/r/t/x\n"
        );
        assert_eq!(
            PostApplyHook::new("true").run("a", 1, Path::new("f")).await,
            0
        );
    }

    #[tokio::test]
    async fn a_slow_hook_is_killed_with_what_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_file = tmp.path().join("pid");
        let hook = PostApplyHook::new(format!(
            "sleep 30 & echo $! > '{}'; wait",
            pid_file.display()
        ))
        .with_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        assert_eq!(hook.run("a", 1, Path::new("f")).await, HOOK_TIMED_OUT);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_gone(&pid_file).await;
    }

    #[tokio::test]
    async fn a_hook_dropped_mid_run_is_killed_with_what_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_file = tmp.path().join("pid");
        let hook = PostApplyHook::new(format!(
            "sleep 30 & echo $! > '{}.tmp'; mv '{0}.tmp' '{0}'; wait",
            pid_file.display()
        ));
        let mut run = Box::pin(hook.run("a", 1, Path::new("f")));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() {
            assert!(std::time::Instant::now() < deadline, "hook never started");
            tokio::select! {
                status = &mut run => panic!("hook ended early: {status}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        drop(run);
        assert_gone(&pid_file).await;
    }

    /// Waits until the process whose pid is in `pid_file` is gone (or a zombie awaiting its
    /// reaper); fails after 5 s.
    async fn assert_gone(pid_file: &Path) {
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let dead = || match std::fs::read_to_string(&stat) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(") ")
                .next()
                .is_some_and(|rest| rest.starts_with('Z')),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !dead() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(dead(), "the hook's background process survived");
    }

    #[tokio::test]
    async fn a_signal_is_reported_as_128_plus_its_number() {
        let hook = PostApplyHook::new("kill -TERM $$");
        assert_eq!(hook.run("a", 1, Path::new("f")).await, 128 + 15);
    }
}
