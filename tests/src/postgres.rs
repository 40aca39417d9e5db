//! A real, throwaway PostgreSQL cluster for tests: a data directory in a temporary directory
//! (a copy of one `initdb` run, cached in the temporary directory),
//! `postgres` on a free loopback port (its unix socket in that directory too), one fresh
//! database per test. One cluster per test process, started at the first use
//! ([`pg_database`]); it stops and its directory is removed when the process ends. A test
//! that stops the database under a running KBS takes a cluster of its own
//! ([`pg_own_cluster`]) and [`PgCluster::stop`]s and [`PgCluster::start_again`]s it: same
//! port, same data directory, so the KBS finds it where it was.
//!
//! PostgreSQL refuses to run as root: as root (this machine, CI) `initdb` and `postgres` run
//! as the `postgres` system user through `setpriv`, on a directory that user owns; otherwise
//! as the current user. Without PostgreSQL's binaries the tests that need it skip, visibly
//! ([`crate::skip`]; a failure under `TETHER_TEST_REQUIRE_ALL=1`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::Connection;

/// How long the cluster may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// The cluster's superuser (trust authentication on loopback only).
const SUPERUSER: &str = "tether";

/// A running PostgreSQL cluster.
pub struct PgCluster {
    /// Its loopback TCP port.
    pub port: u16,
    /// The temporary directory (data, socket, log); removed when the cluster stops.
    pub dir: PathBuf,
    /// The supervising shell: it stops `postgres` and removes `dir` once its stdin closes,
    /// which the end of this process does even when no destructor runs (a static).
    keeper: Mutex<Option<Child>>,
    /// Shells supervising `postgres` started again after a [`stop`](Self::stop) (they
    /// stop it the same way, and leave `dir` to the first keeper).
    restarted: Mutex<Vec<Child>>,
    /// PostgreSQL's binaries.
    bin: PathBuf,
    /// The `postgres` command line (program, then arguments), to start it again.
    postgres: Vec<std::ffi::OsString>,
}

/// A fresh database in the shared cluster.
pub struct PgDatabase {
    /// `postgres://tether@127.0.0.1:<port>/<name>`.
    pub url: String,
    /// Its name.
    pub name: String,
    /// The cluster's port.
    pub port: u16,
}

/// A fresh database for `test` in this process's cluster (started at the first call), or
/// `None` after reporting the skip when PostgreSQL cannot run here.
pub async fn pg_database(test: &str) -> Option<PgDatabase> {
    static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let cluster = CLUSTER.get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}")));
    let cluster = match cluster {
        Ok(c) => c,
        Err(why) => {
            crate::skip(test, why);
            return None;
        }
    };
    let name = format!(
        "t{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    cluster
        .create_database(&name)
        .await
        .expect("CREATE DATABASE");
    Some(PgDatabase {
        url: cluster.url(&name),
        name,
        port: cluster.port,
    })
}

/// A cluster of `test`'s own (one it may stop and start) and a fresh database in it, or
/// `None` after reporting the skip when PostgreSQL cannot run here.
pub async fn pg_own_cluster(test: &str) -> Option<(PgCluster, PgDatabase)> {
    let cluster = match tokio::task::spawn_blocking(PgCluster::start)
        .await
        .expect("starting the cluster")
    {
        Ok(c) => c,
        Err(why) => {
            crate::skip(test, &format!("{why:#}"));
            return None;
        }
    };
    let name = "tether".to_string();
    cluster
        .create_database(&name)
        .await
        .expect("CREATE DATABASE");
    let db = PgDatabase {
        url: cluster.url(&name),
        name,
        port: cluster.port,
    };
    Some((cluster, db))
}

impl PgCluster {
    /// `initdb` and start a cluster; an error says why PostgreSQL cannot run here.
    pub fn start() -> anyhow::Result<Self> {
        let bin = bindir().context("PostgreSQL is not installed (no pg_config, no /usr/lib/postgresql/*/bin/initdb); apt-get install postgresql")?;
        let run_as = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "tether-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let data = dir.join("data");
        let sock = dir.join("sock");
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir(&sock)?;
        if let Some((uid, gid)) = run_as.ids {
            for d in [&dir, &sock] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid))
                    .with_context(|| format!("chown {} to postgres", d.display()))?;
            }
        }
        let template = template(&bin, &run_as)?;
        // `cp -a` keeps the owner (the postgres user) and the 0700 mode PostgreSQL requires.
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .context("copying the initdb template")?;
        if !copied.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "cp -a {} {} failed ({copied})",
                template.display(),
                data.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut postgres = run_as.command(&bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&sock)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // A throwaway cluster: durability off, it only slows tests down.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ]);
        // The keeper: postgres in the background, then wait for stdin to close (this
        // process is gone, or the cluster was dropped), then an immediate shutdown and the
        // directory removed.
        let mut keeper = Command::new("sh");
        keeper
            .arg("-c")
            .arg(
                "\"$@\" & pid=$!; read -r _; kill -QUIT \"$pid\" 2>/dev/null; wait \"$pid\"; rm -rf \"$TETHER_PG_DIR\"",
            )
            .arg("sh")
            .arg(postgres.get_program())
            .args(postgres.get_args())
            .env("TETHER_PG_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("postgres.log"))?);
        let keeper = keeper.spawn().context("starting postgres")?;
        let cluster = Self {
            port,
            dir,
            keeper: Mutex::new(Some(keeper)),
            restarted: Mutex::new(Vec::new()),
            postgres: std::iter::once(postgres.get_program().to_os_string())
                .chain(postgres.get_args().map(|a| a.to_os_string()))
                .collect(),
            bin,
        };
        cluster.wait_ready(&cluster.bin)?;
        Ok(cluster)
    }

    /// Stops the server (a fast shutdown: sessions are ended, new connections refused) and
    /// returns once it is gone; the data directory stays.
    pub fn stop(&self) -> anyhow::Result<()> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        let pid = pid.lines().next().unwrap_or_default().trim().to_string();
        let killed = Command::new("kill").args(["-INT", &pid]).status()?;
        if !killed.success() {
            bail!("kill -INT {pid} failed ({killed})");
        }
        let started = Instant::now();
        while pid_file.exists() {
            if started.elapsed() > READY_WITHIN {
                bail!("postgres did not stop within {READY_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts the server again after [`stop`](Self::stop): same port, same data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut keeper = Command::new("sh");
        keeper
            .arg("-c")
            .arg("\"$@\" & pid=$!; read -r _; kill -QUIT \"$pid\" 2>/dev/null; wait \"$pid\"")
            .arg("sh")
            .args(&self.postgres)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.dir.join("postgres.log"))?,
            );
        let keeper = keeper.spawn().context("starting postgres again")?;
        self.restarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(keeper);
        self.wait_ready(&self.bin)
    }

    /// `postgres://tether@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates the database `name`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(())
    }

    fn wait_ready(&self, bin: &Path) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.keeper_exited() {
                bail!(
                    "postgres exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                );
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-d", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                bail!("postgres did not accept connections within {READY_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keeper_exited(&self) -> Option<std::process::ExitStatus> {
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        keeper.as_mut().and_then(|k| k.try_wait().ok().flatten())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let restarted =
            std::mem::take(&mut *self.restarted.lock().unwrap_or_else(|p| p.into_inner()));
        for mut keeper in restarted {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut keeper) = keeper {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
    }
}

/// An `initdb` result to copy (initdb takes seconds, a copy a fraction of one): made once per
/// machine, PostgreSQL version and user, in the temporary directory, and renamed into place
/// only when complete, so concurrent test processes share it safely.
fn template(bin: &Path, run_as: &RunAs) -> anyhow::Result<PathBuf> {
    let tag: String = bin
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let owner = run_as
        .ids
        .map_or_else(|| "self".to_string(), |(uid, _)| uid.to_string());
    let template = std::env::temp_dir().join(format!("tether-pg-template-{owner}-{tag}"));
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    let staging = std::env::temp_dir().join(format!(
        "tether-pg-template-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&staging)?;
    if let Some((uid, gid)) = run_as.ids {
        std::os::unix::fs::chown(&staging, Some(uid), Some(gid))?;
    }
    let data = staging.join("data");
    let log = staging.with_extension("log");
    let initdb = run_as
        .command(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .status()
        .context("running initdb")?;
    let why = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if !initdb.success() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!("initdb failed ({initdb}): {why}");
    }
    // Another process may have won the race: then its template is used and ours dropped.
    if std::fs::rename(&data, &template).is_err() && !template.join("PG_VERSION").is_file() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!(
            "could not put the initdb template at {}",
            template.display()
        );
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(template)
}

/// PostgreSQL's server binaries: `pg_config --bindir`, else the newest Debian layout.
fn bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config
        && dir.join("initdb").is_file()
    {
        return Some(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// Who runs the cluster: as root, the `postgres` system user (through `setpriv`).
struct RunAs {
    ids: Option<(u32, u32)>,
}

fn run_as() -> anyhow::Result<RunAs> {
    let uid = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!("running as root and there is no `postgres` user to run PostgreSQL as");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    if running_as_root() {
        Ok(RunAs {
            ids: Some((uid("-u")?, uid("-g")?)),
        })
    } else {
        Ok(RunAs { ids: None })
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl RunAs {
    fn command(&self, program: &Path) -> Command {
        match self.ids {
            Some(_) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// A data directory and a `kbs.toml` naming a fresh database of this process's cluster, for
/// real `kbs` processes on PostgreSQL (several may share both: replicas).
pub struct PgKbsSetup {
    /// The database.
    pub db: PgDatabase,
    /// The data directory (not created: the first `kbs` creates it).
    pub data_dir: PathBuf,
    /// `kbs.toml`: `[storage] database_url`, then the caller's `extra` lines.
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

/// [`PgKbsSetup`] for `test`, its config ending with `extra`; `None` after reporting the
/// skip when PostgreSQL cannot run here.
pub async fn pg_kbs_setup(test: &str, extra: &str) -> Option<PgKbsSetup> {
    let db = pg_database(test).await?;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("kbs.toml");
    std::fs::write(
        &config,
        format!("[storage]\ndatabase_url = \"{}\"\n\n{extra}", db.url),
    )
    .expect("write kbs.toml");
    Some(PgKbsSetup {
        db,
        data_dir: dir.path().join("data"),
        config,
        _dir: dir,
    })
}
