//! In-process micro-benchmark of the steps of one RCAR handshake + resource GET, server and
//! client side, to see where the CPU goes (no HTTP). Prints the mean time per call of each step.
//!
//! cargo run --release -p examples --example handshake_steps

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use guest_daemon::evidence::{EvidenceProvider, SampleAttester};
use guest_daemon::rcar::{build_request, runtime_data_digest};
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::attest::{RcarConfig, RcarService, SampleVerifier, Verifier};
use kbs_core::policy::PolicyEngine;
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::{KeyEncryptionKey, ResourceStore, SqliteStore};
use kbs_core::token::TokenSigner;
use kbs_types::{Attestation, CompositeEvidence, HashAlgorithm, RuntimeData, Tee};

#[derive(Parser)]
struct Args {
    /// Iterations per step.
    #[arg(long, default_value_t = 2000)]
    iterations: u32,
}

/// Mean time of `f` over `n` calls (after a short warm-up).
fn time<T>(n: u32, mut f: impl FnMut() -> T) -> Duration {
    for _ in 0..(n / 10).max(1) {
        black_box(f());
    }
    let start = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    start.elapsed() / n
}

async fn time_async<T, F: std::future::Future<Output = T>>(
    n: u32,
    mut f: impl FnMut() -> F,
) -> Duration {
    for _ in 0..(n / 10).max(1) {
        black_box(f().await);
    }
    let start = Instant::now();
    for _ in 0..n {
        black_box(f().await);
    }
    start.elapsed() / n
}

/// One complete handshake in process: auth, client evidence, attest.
async fn handshake(
    rcar: &RcarService,
    key: &TeeKeyPair,
    attester: &SampleAttester,
) -> anyhow::Result<(String, kbs_core::attest::Attested)> {
    let reply = rcar.auth(build_request(Tee::Sample))?;
    let runtime_data = RuntimeData {
        nonce: reply.challenge.nonce.clone(),
        tee_pubkey: key.export_pubkey(),
    };
    let digest = runtime_data_digest(&runtime_data, "", HashAlgorithm::Sha384)?;
    let evidence = attester.primary_evidence(digest).await?;
    let att = Attestation {
        init_data: None,
        runtime_data,
        tee_evidence: CompositeEvidence {
            primary_evidence: evidence,
            additional_evidence: String::new(),
        },
    };
    let attested = rcar.attest(&reply.session_id, att).await?;
    Ok((reply.session_id, attested))
}

fn row(name: &str, d: Duration) {
    println!("{name:<44} {:>9.1} us", d.as_secs_f64() * 1e6);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.iterations;
    let signer = Arc::new(TokenSigner::ephemeral()?);
    let verifiers: Vec<Arc<dyn Verifier>> = vec![Arc::new(SampleVerifier)];
    let rcar = RcarService::new(RcarConfig::default(), signer.clone(), verifiers, &[7u8; 32]);
    let key = TeeKeyPair::new_ec();
    let attester = SampleAttester;

    let (session_id, attested) = handshake(&rcar, &key, &attester).await?;
    let token = attested.token.clone();
    let claims = attested.verified.claims.clone();

    println!("server side (mean per call, {n} iterations, one thread)");
    row(
        "auth (session insert, nonce)",
        time(n, || rcar.auth(build_request(Tee::Sample))),
    );
    let reply = rcar.auth(build_request(Tee::Sample))?;
    let runtime_data = RuntimeData {
        nonce: reply.challenge.nonce.clone(),
        tee_pubkey: key.export_pubkey(),
    };
    let digest = runtime_data_digest(&runtime_data, "", HashAlgorithm::Sha384)?;
    let evidence = attester.primary_evidence(digest.clone()).await?;
    let att = Attestation {
        init_data: None,
        runtime_data,
        tee_evidence: CompositeEvidence {
            primary_evidence: evidence.clone(),
            additional_evidence: String::new(),
        },
    };
    let att_json = serde_json::to_vec(&att)?;
    row(
        "parse Attestation JSON",
        time(n, || serde_json::from_slice::<Attestation>(&att_json)),
    );
    row(
        "validate tee-pubkey",
        time(n, || {
            kbs_core::jwe::validate_tee_pubkey(&att.runtime_data.tee_pubkey).is_ok()
        }),
    );
    row(
        "sample verifier (verify evidence)",
        time_async(n, || SampleVerifier.verify(&evidence, &digest, None)).await,
    );
    let mut map = serde_json::Map::new();
    if let serde_json::Value::Object(m) = claims.to_value() {
        map = m;
    }
    for k in ["iat", "exp", "jti"] {
        map.remove(k);
    }
    row(
        "token issue (ES256 sign + claims JSON)",
        time(n, || signer.issue(map.clone(), Duration::from_secs(300))),
    );
    row(
        "token issue_verified",
        time(n, || {
            signer.issue_verified(map.clone(), Duration::from_secs(300))
        }),
    );
    let fresh: Vec<String> = (0..n)
        .map(|_| signer.issue(map.clone(), Duration::from_secs(300)))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    for t in &fresh {
        black_box(signer.verify(t)?);
    }
    row("token verify, first time (ES256)", start.elapsed() / n);
    row(
        "token verify, again (digest cache hit)",
        time(n, || signer.verify(&token)),
    );
    let mut total_attest = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        black_box(handshake(&rcar, &key, &attester).await?);
        total_attest += t.elapsed();
    }
    row(
        "auth + client evidence + attest (in-process)",
        total_attest / n,
    );
    row(
        "session_token (cookie lookup + clone)",
        time(n, || rcar.session_token(&session_id)),
    );
    let policy = PolicyEngine::new(include_str!("policies/allow-sample.rego"))?;
    let data = serde_json::json!({
        "plugin": "resource",
        "resource-path": ["default", "key", "bench"],
        "query": BTreeMap::<String, String>::new(),
    });
    row(
        "policy evaluate",
        time(n, || policy.evaluate_json(claims.json(), &data)),
    );
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("kbs.db").display());
    let store = SqliteStore::open(&url, Arc::new(KeyEncryptionKey::from_bytes(&[9u8; 32]))).await?;
    let path: ResourcePath = "default/key/bench".parse().map_err(anyhow::Error::msg)?;
    store.put_resource(&path, &[7u8; 32], "bench").await?;
    row(
        "store get_resource (latest cached + KEK open)",
        time_async(n, || store.get_resource(&path, None)).await,
    );
    let tee_pubkey = key.export_pubkey();
    row(
        "JWE seal (ECDH-ES+A256KW, A256GCM)",
        time(n, || kbs_core::jwe::seal(&tee_pubkey, &[7u8; 32])),
    );
    let sealed = kbs_core::jwe::seal(&tee_pubkey, &[7u8; 32])?;
    row(
        "JWE response to JSON",
        time(n, || serde_json::to_vec(&sealed)),
    );

    println!("client side");
    row("TEE key generate (EC P-256)", time(n, TeeKeyPair::new_ec));
    row("TEE key export_pubkey", time(n, || key.export_pubkey()));
    let rd = RuntimeData {
        nonce: reply.challenge.nonce.clone(),
        tee_pubkey: key.export_pubkey(),
    };
    row(
        "runtime-data digest (JCS + sha384)",
        time(n, || runtime_data_digest(&rd, "", HashAlgorithm::Sha384)),
    );
    row(
        "serialize Attestation JSON",
        time(n, || serde_json::to_vec(&att)),
    );
    let sealed_json = serde_json::to_vec(&sealed)?;
    row("JWE parse + open", time(n, || key.open_json(&sealed_json)));
    Ok(())
}
