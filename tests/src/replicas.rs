//! Several real `kbs` processes as the replicas of one KBS: one shared data directory (the
//! key files: KEK, token signing key, admin key) and one shared database, each on its own
//! port (README, "Running several replicas"). The database is one parameter: the SQLite file
//! in the shared data directory (several processes on one machine, WAL), or any URL the
//! `kbs` binary takes in `[storage] database_url`. Also an RCAR client whose three steps go
//! to three different replicas.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use guest_daemon::evidence::{EvidenceProvider, SampleAttester};
use guest_daemon::rcar::{build_request, runtime_data_digest, select_hash_algorithm};
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use kbs_types::{Attestation, Challenge, CompositeEvidence, InitData, RuntimeData, Tee};
use server::admin_client::AdminClient;

use crate::kbs::ALLOW_SAMPLE;
use crate::process::{Spawned, spawn_kbs_with};

/// The replicas (each killed on drop).
pub struct Replicas {
    /// The data directory they share.
    pub data_dir: PathBuf,
    /// The database URL they share (`KBS_STORAGE__DATABASE_URL`).
    pub database_url: String,
    /// Their config file (the allow-sample policy as the initial policy).
    pub config: PathBuf,
    procs: Vec<Option<Spawned>>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Replicas {
    /// `n` replicas started at the same moment on an empty data directory (so they race to
    /// generate the key files), sharing the PostgreSQL database `database_url` (an SQLite
    /// database is one process's own: a second `kbs` on it refuses to start).
    pub async fn start(n: usize, database_url: &str) -> Self {
        Self::start_with(n, database_url, "").await
    }

    /// [`start`](Self::start) with more configuration: `extra_toml` is appended to their
    /// config file (`[attestation]\ntoken_ttl = "2h"\n`, say; not `[policy]`).
    pub async fn start_with(n: usize, database_url: &str, extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let policy = dir.path().join("allow-sample.rego");
        std::fs::write(&policy, ALLOW_SAMPLE).expect("write the policy");
        let config = dir.path().join("kbs.toml");
        std::fs::write(
            &config,
            format!(
                "[policy]\ninitial_policy_file = {:?}\n{extra_toml}",
                policy.display().to_string()
            ),
        )
        .expect("write the config");
        let database_url = database_url.to_owned();
        let env = [("KBS_STORAGE__DATABASE_URL", database_url.as_str())];
        let procs = futures::future::join_all(
            (0..n).map(|_| spawn_kbs_with("127.0.0.1:0", &data_dir, Some(&config), &env)),
        )
        .await;
        let urls = procs.iter().map(|p| p.announced.clone()).collect();
        Self {
            data_dir,
            database_url,
            config,
            procs: procs.into_iter().map(Some).collect(),
            urls,
            _dir: dir,
        }
    }

    /// Base URL of replica `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// Their `host:port` addresses (for a load balancer's configuration).
    pub fn addrs(&self) -> Vec<String> {
        self.urls
            .iter()
            .map(|u| u.trim_start_matches("http://").to_owned())
            .collect()
    }

    /// How many replicas were started.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Never: at least one replica is started.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// An admin client of replica `i`, with the shared development admin key.
    pub fn admin(&self, i: usize) -> AdminClient {
        admin_client(&self.data_dir, self.url(i))
    }

    /// Process id of replica `i` (`None` once killed).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().and_then(|p| p.child.id())
    }

    /// How many guests each replica in `live` holds connected (what its fleet view says;
    /// 0 for one that does not answer).
    pub async fn held(&self, live: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        for &i in live {
            let guests = self.admin(i).list_guests().await.unwrap_or_default();
            out.push(guests.iter().filter(|g| g.connected).count());
        }
        out
    }

    /// `kill -9` replica `i`.
    pub async fn kill_9(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill_9().await;
        }
    }

    /// Stops replica `i` gracefully (SIGTERM: it drains its tunnels with GoAway) and waits
    /// for it to exit, for at most `within`; its exit status.
    pub async fn terminate(
        &mut self,
        i: usize,
        within: std::time::Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut p = self.procs[i].take().context("replica already stopped")?;
        p.terminate(within).await
    }
}

/// An admin client of the KBS at `url` with the development admin key of `data_dir`.
pub fn admin_client(data_dir: &Path, url: &str) -> AdminClient {
    let key = AdminKeyPair::load(&data_dir.join("admin.key")).expect("admin key");
    AdminClient::new(url, key, None).expect("admin client")
}

/// The session cookie a KBS answer sets (`kbs-session-id=...`), as a `Cookie` header value.
fn session_cookie(resp: &reqwest::Response) -> anyhow::Result<String> {
    let header = resp
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .context("no Set-Cookie")?
        .to_str()?;
    let pair = header.split(';').next().unwrap_or_default().trim();
    if !pair.starts_with("kbs-session-id=") {
        bail!("unexpected cookie {pair}");
    }
    Ok(pair.to_owned())
}

async fn ok_or_error(resp: reqwest::Response, step: &str) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    bail!("{step}: {status} {body}")
}

/// RCAR with the sample TEE, one step per KBS: `auth` on `auth_url`, `attest` on
/// `attest_url` (with the cookie `auth` set), then the resource GET of `path` on `get_url`
/// (with the cookie `attest` set), each over its own connection; returns the opened
/// plaintext. The client keeps nothing but the cookie between the steps, as a browser-style
/// cookie jar behind a load balancer does.
pub async fn rcar_across(
    [auth_url, attest_url, get_url]: [&str; 3],
    key: &TeeKeyPair,
    init_data: Option<&str>,
    path: &str,
) -> anyhow::Result<Vec<u8>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let resp = http
        .post(format!("{auth_url}/kbs/v0/auth"))
        .json(&build_request(Tee::Sample))
        .send()
        .await?;
    let resp = ok_or_error(resp, "auth").await?;
    let cookie = session_cookie(&resp)?;
    let challenge: Challenge = resp.json().await?;
    let hash = select_hash_algorithm(&challenge.extra_params)?;
    let runtime_data = RuntimeData {
        nonce: challenge.nonce,
        tee_pubkey: key.export_pubkey(),
    };
    let report_data = runtime_data_digest(&runtime_data, "", hash)?;
    let primary_evidence = SampleAttester.primary_evidence(report_data).await?;
    let attestation = Attestation {
        init_data: init_data.map(|body| InitData {
            format: "toml".into(),
            body: body.into(),
        }),
        runtime_data,
        tee_evidence: CompositeEvidence {
            primary_evidence,
            additional_evidence: String::new(),
        },
    };
    let resp = http
        .post(format!("{attest_url}/kbs/v0/attest"))
        .header(reqwest::header::COOKIE, &cookie)
        .json(&attestation)
        .send()
        .await?;
    let resp = ok_or_error(resp, "attest").await?;
    let cookie = session_cookie(&resp)?;
    let resp = http
        .get(format!("{get_url}/kbs/v0/resource/{path}"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?;
    let jwe = ok_or_error(resp, "resource GET").await?.bytes().await?;
    Ok(key.open_json(&jwe)?.to_vec())
}
