//! Verification cost per piece of evidence, on one thread, with the shared test vectors:
//! warm collateral p50/p99 for TDX and SNP, cold start against a local PCCS/KDS-shaped HTTP
//! server (time to the first verified quote / report) and fetches per 10,000 verifications.
//! Every check runs: nothing is bypassed.
//!
//! `cargo run --release -p tee-verifiers --example verify_bench [-- ITERATIONS [tdx|snp]]`
//!
//! With `tdx` or `snp` only that warm loop runs (for `valgrind --tool=callgrind`, whose
//! instruction counts do not depend on what else the machine is doing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/pccs_server.rs"]
mod pccs_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tee_verifiers::collateral::{
    CollateralStore, HttpFetcher, HttpFetcherConfig, StoreConfig, TdxCollateral,
};
use tee_verifiers::{Collateral, TeeKind, Verifier, verify};

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (
        at(0.50),
        at(0.99),
        v.iter().sum::<Duration>().as_secs_f64() * 1e3 / v.len() as f64,
    )
}

fn bench(name: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..n / 10 + 1 {
        f(); // warm-up
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
        bench("SNP report + VCEK chain (ring)", n, || {
            verify(
                TeeKind::Snp,
                &snp_ev,
                &snp_rd,
                None,
                &Collateral::None,
                snp_now(),
            )
            .unwrap();
        });
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
        let verifier = Verifier::new(Arc::new(store));
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
