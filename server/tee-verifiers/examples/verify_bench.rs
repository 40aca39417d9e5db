//! Verification cost per piece of evidence, on one thread, with the shared test vectors:
//! warm collateral p50/p99 for TDX and SNP, cold start against a local PCCS/KDS-shaped HTTP
//! server (time to the first verified quote / report) and fetches per 10,000 verifications.
//! Every check runs: nothing is bypassed.
//!
//! SNP is measured twice: the shared real report, which comes without AMD's CRL (verified
//! under the `if-published` CRL policy), and the same report re-signed under an AMD-shaped
//! test PKI (made with the openssl CLI, as the tests do) with a CRL of its ARK, under the
//! default `required` policy: the CRL's signature is checked once per CRL and remembered, so
//! the warm figure is the cached one; the first, uncached check is printed on its own, with
//! the RSASSA-PSS verification it adds (test ARK RSA-2048; AMD's ARK is RSA-4096, measured
//! over the ASK certificate AMD's Milan ARK signed, the same operation).
//!
//! `cargo run --release -p tee-verifiers --example verify_bench [-- ITERATIONS [tdx|snp]]`
//!
//! With `tdx` or `snp` only that warm loop runs (for `valgrind --tool=callgrind`, whose
//! instruction counts do not depend on what else the machine is doing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/amd_pki.rs"]
mod amd_pki;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/pccs_server.rs"]
mod pccs_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ring::signature::{RSA_PSS_2048_8192_SHA384, UnparsedPublicKey};
use serde_json::Value;
use tee_verifiers::collateral::{
    CollateralStore, HttpFetcher, HttpFetcherConfig, SnpCollateral, StoreConfig, TdxCollateral,
};
use tee_verifiers::snp::Generation;
use tee_verifiers::{Collateral, Decoded, TeeKind, TrustAnchors, Verifier, verify};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (
        at(0.50),
        at(0.99),
        v.iter().sum::<Duration>().as_secs_f64() * 1e3 / v.len() as f64,
    )
}

fn bench(name: &str, n: usize, f: impl FnMut()) {
    bench_from(name, n, n / 10 + 1, f);
}

fn bench_from(name: &str, n: usize, warm_up: usize, mut f: impl FnMut()) {
    for _ in 0..warm_up {
        f();
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    let (p50, p99, mean) = percentiles(times);
    println!("{name:<34} n={n:<6} p50 {p50:7.3} ms   p99 {p99:7.3} ms   mean {mean:7.3} ms");
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let only = std::env::args().nth(2);
    println!("warm collateral, one thread (no bypass: full chain, signature, TCB, binding)");

    let tdx_c = tdx_collateral(TDX_COLLATERAL);
    let now = inside(&tdx_c);
    let tdx_ev = tdx_evidence(TDX_QUOTE);
    let tdx_rd = tdx_report_data(TDX_QUOTE);
    let coll = tdx(&tdx_c);
    if only.as_deref() != Some("snp") {
        bench("TDX quote v4 (dcap-qvl, ring)", n, || {
            let c = verify(TeeKind::Tdx, &tdx_ev, &tdx_rd, None, &coll, now).unwrap();
            assert_eq!(c.0["tcb_status"], "UpToDate");
        });
    }

    let snp_ev = snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK);
    let snp_rd = snp_report_data(SNP_REPORT);
    if only.as_deref() != Some("tdx") {
        let anchors = vendor_if_published();
        bench("SNP report + VCEK chain, no CRL", n, || {
            Decoded::new(TeeKind::Snp, &snp_ev)
                .unwrap()
                .verify_with(&anchors, &snp_rd, None, &Collateral::None, snp_now())
                .unwrap();
        });
        snp_with_crl(n);
    }
    if only.is_some() {
        return;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap().collateral;
        let hwid = hex::encode(&SNP_REPORT[0x1A0..0x1E0]);
        let (addr, pccs) = pccs_server::start(
            c,
            vec![(
                "Milan".into(),
                hwid,
                "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115".into(),
                SNP_VCEK.to_vec(),
            )],
        )
        .await;
        let url = format!("http://{addr}");
        let store = CollateralStore::new(
            Arc::new(
                HttpFetcher::new(HttpFetcherConfig {
                    pccs_url: url.clone(),
                    root_ca_crl_url: None,
                    kds_url: url,
                    timeout: Duration::from_secs(5),
                })
                .unwrap(),
            ),
            StoreConfig::default(),
        );
        // This KDS publishes no AMD CRL for the real report (see snp_with_crl).
        let verifier = Verifier::new(Arc::new(store)).with_trust_anchors(vendor_if_published());
        let mut snp_ev_fetch = snp_ev.clone();
        snp_ev_fetch["cert_chain"] = Value::Null;

        println!("\ncold start against a local PCCS/KDS-shaped HTTP server (loopback)");
        let t = Instant::now();
        verifier
            .verify(TeeKind::Tdx, &tdx_ev, &tdx_rd, None, now)
            .await
            .unwrap();
        println!(
            "time to first verified TDX quote   {:7.3} ms (4 collateral fetches)",
            t.elapsed().as_secs_f64() * 1e3
        );
        let t = Instant::now();
        verifier
            .verify(TeeKind::Snp, &snp_ev_fetch, &snp_rd, None, now)
            .await
            .unwrap();
        println!(
            "time to first verified SNP report  {:7.3} ms (VCEK fetched from KDS)",
            t.elapsed().as_secs_f64() * 1e3
        );

        let before: usize = pccs.all_hits().values().sum();
        let t = Instant::now();
        for _ in 0..10_000 {
            verifier
                .verify(TeeKind::Tdx, &tdx_ev, &tdx_rd, None, now)
                .await
                .unwrap();
        }
        let tdx_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..10_000 {
            verifier
                .verify(TeeKind::Snp, &snp_ev_fetch, &snp_rd, None, now)
                .await
                .unwrap();
        }
        let snp_secs = t.elapsed().as_secs_f64();
        let after: usize = pccs.all_hits().values().sum();
        println!(
            "\nthrough the cache: 10,000 TDX in {tdx_secs:.2} s ({:.0}/s), 10,000 SNP in {snp_secs:.2} s ({:.0}/s)",
            1e4 / tdx_secs,
            1e4 / snp_secs
        );
        println!(
            "fetches during those 20,000 verifications: {} (total since cold start: {after}: {:?})",
            after - before,
            pccs.all_hits()
        );
    });
}

/// SNP under the default `required` CRL policy with AMD's CRL: the test PKI's report and a
/// CRL of its ARK that lists another serial.
fn snp_with_crl(n: usize) {
    let pki = amd_pki::AmdPki::new(SNP_REPORT);
    let report = pki.resign(SNP_REPORT);
    let ev = snp_evidence(&report, "VCEK", &pki.vcek());
    let rd = snp_report_data(&report);
    let anchors = pki.anchors();
    let crl_der = pki.crl("crl-none");
    let collateral = Collateral::Snp(SnpCollateral {
        vcek: None,
        crl: Some(Arc::new(crl_der.clone())),
    });
    // The fixtures are valid from when they were made.
    let at = std::time::SystemTime::now() + Duration::from_secs(24 * 3600);
    let once = || {
        Decoded::new(TeeKind::Snp, &ev)
            .unwrap()
            .verify_with(&anchors, &rd, None, &collateral, at)
            .unwrap();
    };
    let t = Instant::now();
    once();
    println!(
        "{:<34} n=1      {:7.3} ms (CRL signature verified, then remembered)",
        "SNP + AMD CRL, first (uncached)",
        t.elapsed().as_secs_f64() * 1e3
    );
    bench_from("SNP + AMD CRL, cached signature", n, n / 10, once);

    // What an uncached CRL adds: its RSASSA-PSS SHA-384 signature, with the test ARK...
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    let ark_der = anchors.amd_roots(Generation::Milan).unwrap().ark.clone();
    let (_, ark) = X509Certificate::from_der(&ark_der).unwrap();
    let key = UnparsedPublicKey::new(
        &RSA_PSS_2048_8192_SHA384,
        ark.public_key().subject_public_key.data.to_vec(),
    );
    let (tbs, sig) = (
        crl.tbs_cert_list.as_ref(),
        crl.signature_value.data.to_vec(),
    );
    bench("  CRL signature alone, test ARK 2048", n, || {
        key.verify(tbs, &sig).unwrap();
    });
    // ...and with AMD's Milan ARK (RSA-4096), over the ASK it signed: the same operation
    // an uncached AMD CRL costs.
    let roots = TrustAnchors::vendor();
    let amd = roots.amd_roots(Generation::Milan).unwrap();
    let (_, amd_ark) = X509Certificate::from_der(&amd.ark).unwrap();
    let (_, amd_ask) = X509Certificate::from_der(&amd.ask).unwrap();
    let amd_key = UnparsedPublicKey::new(
        &RSA_PSS_2048_8192_SHA384,
        amd_ark.public_key().subject_public_key.data.to_vec(),
    );
    let (amd_tbs, amd_sig) = (
        amd_ask.tbs_certificate.as_ref(),
        amd_ask.signature_value.data.to_vec(),
    );
    bench("  same, AMD Milan ARK 4096", n, || {
        amd_key.verify(amd_tbs, &amd_sig).unwrap();
    });
}
