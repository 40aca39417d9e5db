//! Collateral fetch and cache against a real HTTP server on a free loopback port, shaped
//! like a PCCS (v4) and AMD KDS; offline collateral from files.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/pccs_server.rs"]
mod pccs_server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use common::*;
use serde_json::Value;
use tee_verifiers::collateral::{
    CollateralKey, CollateralStore, HttpFetcher, HttpFetcherConfig, OfflineFetcher,
    PersistentCache, RefreshClock, StoreConfig, TdxCollateral,
};
use tee_verifiers::{TeeKind, Verifier, VerifyError};

const VCEK_QUERY: &str = "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115";

fn snp_evidence_without_vcek() -> Value {
    let mut ev = snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK);
    ev["cert_chain"] = Value::Null;
    ev
}

async fn server() -> (String, Arc<pccs_server::Pccs>) {
    let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap().collateral;
    let hwid = hex::encode(&SNP_REPORT[0x1A0..0x1E0]);
    let (addr, state) = pccs_server::start(
        c,
        vec![("Milan".into(), hwid, VCEK_QUERY.into(), SNP_VCEK.to_vec())],
    )
    .await;
    (format!("http://{addr}"), state)
}

fn store(url: &str, config: StoreConfig) -> CollateralStore {
    let fetcher = HttpFetcher::new(HttpFetcherConfig {
        pccs_url: url.into(),
        root_ca_crl_url: None,
        kds_url: url.into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    CollateralStore::new(Arc::new(fetcher), config)
}

fn window() -> (i64, i64) {
    let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap();
    (c.not_before, c.not_after)
}

fn at(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix as u64)
}

/// A time when both the TDX collateral and the test VCEK are valid.
fn now() -> SystemTime {
    inside(&TdxCollateral::from_json(TDX_COLLATERAL).unwrap())
}

#[tokio::test]
async fn ten_thousand_verifications_fetch_each_item_once() {
    let (url, pccs) = server().await;
    // This KDS publishes no AMD CRL (see snp_revocation.rs for the CRL).
    let verifier = Verifier::new(Arc::new(store(&url, StoreConfig::default())))
        .with_trust_anchors(vendor_if_published());
    let tdx_ev = tdx_evidence(TDX_QUOTE);
    let tdx_rd = tdx_report_data(TDX_QUOTE);
    let snp_ev = snp_evidence_without_vcek();
    let snp_rd = snp_report_data(SNP_REPORT);
    for _ in 0..10_000 {
        let c = verifier
            .verify(TeeKind::Tdx, &tdx_ev, &tdx_rd, None, now())
            .await
            .unwrap();
        assert_eq!(c.0["tcb_status"], "UpToDate");
    }
    for _ in 0..10_000 {
        verifier
            .verify(TeeKind::Snp, &snp_ev, &snp_rd, None, now())
            .await
            .unwrap();
    }
    let fmspc = serde_json::from_str::<Value>(
        &TdxCollateral::from_json(TDX_COLLATERAL)
            .unwrap()
            .collateral
            .tcb_info,
    )
    .unwrap()["fmspc"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    let expected: HashMap<String, usize> = [
        ("pckcrl?ca=platform".to_string(), 1),
        ("rootcacrl".into(), 1),
        (format!("tcb?fmspc={fmspc}"), 1),
        ("qe/identity".into(), 1),
        ("vcek/Milan".into(), 1),
        // AMD's CRL: this server publishes none (404), which is remembered like an item.
        ("crl/Milan".into(), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(pccs.all_hits(), expected);
}

#[tokio::test]
async fn items_are_refreshed_before_next_update() {
    let (url, pccs) = server().await;
    let (nb, na) = window();
    let config = StoreConfig {
        refresh_before: Duration::from_secs(3600),
        retry_after: Duration::from_secs(60),
        ..StoreConfig::default()
    };
    let verifier = Verifier::new(Arc::new(store(&url, config)));
    let ev = tdx_evidence(TDX_QUOTE);
    let rd = tdx_report_data(TDX_QUOTE);
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(nb + 10))
        .await
        .unwrap();
    assert_eq!(pccs.hits("qe/identity"), 1);
    // Half an hour before the earliest nextUpdate: inside the refresh margin of that item.
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(na - 1800))
        .await
        .unwrap();
    let total: usize = pccs.all_hits().values().sum();
    assert!(total > 4, "nothing refetched: {:?}", pccs.all_hits());
}

#[tokio::test]
async fn outage_with_a_valid_cached_copy_is_not_an_error() {
    let (url, pccs) = server().await;
    let (nb, na) = window();
    let config = StoreConfig {
        refresh_before: Duration::from_secs(3600),
        retry_after: Duration::from_secs(60),
        ..StoreConfig::default()
    };
    let verifier = Verifier::new(Arc::new(store(&url, config)));
    let ev = tdx_evidence(TDX_QUOTE);
    let rd = tdx_report_data(TDX_QUOTE);
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(nb + 10))
        .await
        .unwrap();
    pccs.set_down(true);
    let before = pccs.all_hits().values().sum::<usize>();
    // In the refresh margin of the earliest-expiring item, service down: cached copy served,
    // one failed refresh attempt, then no retry within retry_after.
    for i in 0..100 {
        verifier
            .verify(TeeKind::Tdx, &ev, &rd, None, at(na - 1800 + i / 10))
            .await
            .unwrap();
    }
    let attempts = pccs.all_hits().values().sum::<usize>() - before;
    assert!((1..=4).contains(&attempts), "{attempts} refresh attempts");
    // Past nextUpdate the cached copy is no longer valid and the service is still down.
    let err = verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(na + 10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn no_cache_and_no_service_is_collateral_unavailable() {
    let (url, pccs) = server().await;
    pccs.set_down(true);
    let verifier = Verifier::new(Arc::new(store(&url, StoreConfig::default())));
    let err = verifier
        .verify(
            TeeKind::Tdx,
            &tdx_evidence(TDX_QUOTE),
            &tdx_report_data(TDX_QUOTE),
            None,
            now(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
    let err = verifier
        .verify(
            TeeKind::Snp,
            &snp_evidence_without_vcek(),
            &snp_report_data(SNP_REPORT),
            None,
            now(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_chip_is_collateral_unavailable() {
    let (url, _pccs) = server().await;
    let verifier = Verifier::new(Arc::new(store(&url, StoreConfig::default())))
        .with_trust_anchors(vendor_if_published());
    let mut r = SNP_REPORT.to_vec();
    r[0x1A0] ^= 1; // another chip id: KDS answers 404 under Milan and Genoa
    let mut ev = snp_evidence(&r, "VCEK", SNP_VCEK);
    ev["cert_chain"] = Value::Null;
    let err = verifier
        .verify(TeeKind::Snp, &ev, &snp_report_data(&r), None, now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
}

#[derive(Default)]
struct MemoryCache(Mutex<HashMap<String, Vec<u8>>>);

#[async_trait]
impl PersistentCache for MemoryCache {
    async fn load(&self, name: &str) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(name).cloned()
    }
    async fn store(&self, name: &str, bytes: Vec<u8>) {
        self.0.lock().unwrap().insert(name.to_owned(), bytes);
    }
}

#[tokio::test]
async fn persistent_cache_serves_a_restarted_verifier_during_an_outage() {
    let (url, pccs) = server().await;
    let persistent = Arc::new(MemoryCache::default());
    let first = Verifier::new(Arc::new(
        store(&url, StoreConfig::default()).with_persistent_cache(persistent.clone()),
    ));
    let ev = tdx_evidence(TDX_QUOTE);
    let rd = tdx_report_data(TDX_QUOTE);
    first
        .verify(TeeKind::Tdx, &ev, &rd, None, now())
        .await
        .unwrap();
    assert_eq!(persistent.0.lock().unwrap().len(), 4);

    pccs.set_down(true);
    let before = pccs.all_hits().values().sum::<usize>();
    let restarted = Verifier::new(Arc::new(
        store(&url, StoreConfig::default()).with_persistent_cache(persistent.clone()),
    ));
    restarted
        .verify(TeeKind::Tdx, &ev, &rd, None, now())
        .await
        .unwrap();
    assert_eq!(
        pccs.all_hits().values().sum::<usize>(),
        before,
        "no fetch needed"
    );
}

#[tokio::test]
async fn offline_collateral_from_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tdx")).unwrap();
    std::fs::create_dir_all(dir.path().join("snp")).unwrap();
    std::fs::write(dir.path().join("tdx/platform-a.json"), TDX_COLLATERAL).unwrap();
    std::fs::write(dir.path().join("snp/vcek.der"), SNP_VCEK).unwrap();
    let fetcher = OfflineFetcher::from_dir(dir.path()).unwrap();
    let verifier = Verifier::new(Arc::new(CollateralStore::new(
        Arc::new(fetcher),
        StoreConfig::default(),
    )))
    .with_trust_anchors(vendor_if_published());
    let c = verifier
        .verify(
            TeeKind::Tdx,
            &tdx_evidence(TDX_QUOTE),
            &tdx_report_data(TDX_QUOTE),
            None,
            now(),
        )
        .await
        .unwrap();
    assert_eq!(c.0["tcb_status"], "UpToDate");
    verifier
        .verify(
            TeeKind::Snp,
            &snp_evidence_without_vcek(),
            &snp_report_data(SNP_REPORT),
            None,
            now(),
        )
        .await
        .unwrap();
}

/// A clock the test moves by hand; the refresher's sleeps end when it reaches their time.
struct ManualClock(tokio::sync::watch::Sender<i64>);

impl ManualClock {
    fn new(at: i64) -> Arc<Self> {
        Arc::new(ManualClock(tokio::sync::watch::Sender::new(at)))
    }
    fn set(&self, at: i64) {
        self.0.send_replace(at);
    }
}

#[async_trait]
impl RefreshClock for ManualClock {
    fn now(&self) -> i64 {
        *self.0.borrow()
    }
    async fn sleep_until(&self, unix: i64) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|t| *t >= unix).await;
    }
}

/// Waits (real time, up to 10 s) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn total(pccs: &pccs_server::Pccs) -> usize {
    pccs.all_hits().values().sum()
}

#[tokio::test]
async fn refresher_refreshes_each_item_before_next_update_without_any_attestation() {
    let (url, pccs) = server().await;
    let (nb, _) = window();
    let margin = 3600;
    let config = StoreConfig {
        refresh_before: Duration::from_secs(margin as u64),
        retry_after: Duration::from_secs(60),
        ..StoreConfig::default()
    };
    let store = Arc::new(store(&url, config));
    let verifier = Verifier::new(store.clone());
    let ev = tdx_evidence(TDX_QUOTE);
    let rd = tdx_report_data(TDX_QUOTE);
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(nb + 10))
        .await
        .unwrap();
    assert_eq!(total(&pccs), 4);
    // When each item is due: `margin` before its nextUpdate. The PCK CRL, TCB info and QE
    // identity of the vector expire within the hour of each other; the root CA CRL in 2026.
    let mut dues = Vec::new();
    for key in tee_verifiers::collateral_request(TeeKind::Tdx, &ev)
        .unwrap()
        .keys()
    {
        let item = store.item(&key, nb + 10).await.unwrap();
        dues.push((item.next_update - margin, key));
    }
    dues.sort();
    assert_eq!(dues[3].1, CollateralKey::RootCaCrl);
    let dues: Vec<i64> = dues[..3].iter().map(|d| d.0).collect();

    let clock = ManualClock::new(nb + 10);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(store.clone().run_refresher(clock.clone(), async move {
        let _ = stopped.await;
    }));

    // One second before the first item is due: nothing is fetched.
    clock.set(dues[0] - 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(&pccs), 4, "{:?}", pccs.all_hits());
    // Due: it is fetched, with no attestation asking.
    clock.set(dues[0]);
    eventually("the first refresh", || total(&pccs) == 5).await;
    // Then each of the others at its own due time, before its nextUpdate; not the root CA
    // CRL, which is not due.
    clock.set(dues[2]);
    eventually("the three due items refreshed", || {
        pccs.all_hits().iter().all(|(path, n)| {
            if path == "rootcacrl" {
                *n == 1
            } else {
                *n >= 2
            }
        })
    })
    .await;
    // An attestation now finds everything cached: no fetch.
    let before = total(&pccs);
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(dues[2]))
        .await
        .unwrap();
    assert_eq!(total(&pccs), before);

    // The service goes down: the refresher keeps the valid copies and retries with a
    // growing backoff (retry_after, then doubling), not in a loop.
    pccs.set_down(true);
    let t1 = dues[2] + 100;
    let mut attempts = Vec::new();
    for step in [0, 30, 60, 120, 180, 300, 420, 600, 900] {
        let before = total(&pccs);
        clock.set(t1 + step);
        tokio::time::sleep(Duration::from_millis(200)).await;
        attempts.push((step, total(&pccs) - before));
    }
    let expected: Vec<(i64, usize)> = [0, 30, 60, 120, 180, 300, 420, 600, 900]
        .into_iter()
        .map(|s| {
            (
                s,
                if [0, 60, 180, 420, 900].contains(&s) {
                    3
                } else {
                    0
                },
            )
        })
        .collect();
    assert_eq!(attempts, expected);
    // Still before nextUpdate: the cached copies verify.
    verifier
        .verify(TeeKind::Tdx, &ev, &rd, None, at(t1 + 900))
        .await
        .unwrap();

    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn offline_directory_changes_are_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tdx")).unwrap();
    std::fs::create_dir_all(dir.path().join("snp")).unwrap();
    std::fs::write(dir.path().join("tdx/platform-a.json"), TDX_COLLATERAL).unwrap();
    let config = StoreConfig {
        source_poll: Duration::from_secs(60),
        ..StoreConfig::default()
    };
    let store = Arc::new(CollateralStore::new(
        Arc::new(OfflineFetcher::from_dir(dir.path()).unwrap()),
        config,
    ));
    let verifier = Verifier::new(store.clone()).with_trust_anchors(vendor_if_published());
    let t = inside(&TdxCollateral::from_json(TDX_COLLATERAL).unwrap());
    let t_unix = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let snp_ev = snp_evidence_without_vcek();
    let snp_rd = snp_report_data(SNP_REPORT);
    let snp = || verifier.verify(TeeKind::Snp, &snp_ev, &snp_rd, None, t);
    // No VCEK among the files yet.
    let err = snp().await.unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
    verifier
        .verify(
            TeeKind::Tdx,
            &tdx_evidence(TDX_QUOTE),
            &tdx_report_data(TDX_QUOTE),
            None,
            t,
        )
        .await
        .unwrap();
    let qe_before = store
        .item(&CollateralKey::TdxQeIdentity, t_unix)
        .await
        .unwrap();

    let clock = ManualClock::new(t_unix);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(store.clone().run_refresher(clock.clone(), async move {
        let _ = stopped.await;
    }));
    // Let it start (its first scan is due 60 s after it starts).
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The operator drops in the VCEK and another bundle (whose QE identity is newer).
    std::fs::write(dir.path().join("snp/vcek.der"), SNP_VCEK).unwrap();
    std::fs::write(
        dir.path().join("tdx/platform-b.json"),
        TDX_OUTDATED_COLLATERAL,
    )
    .unwrap();
    // Before the next scan the files are not read.
    clock.set(t_unix + 59);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(snp().await.is_err());
    // At the scan: the VCEK is served and the cached QE identity replaced by the newer one.
    clock.set(t_unix + 60);
    let mut replaced = None;
    for _ in 0..200 {
        let qe = store
            .item(&CollateralKey::TdxQeIdentity, t_unix + 60)
            .await
            .unwrap();
        if qe.next_update != qe_before.next_update {
            replaced = Some(qe);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced = replaced.expect("QE identity not replaced after the scan");
    assert!(replaced.next_update > qe_before.next_update);
    snp().await.unwrap();

    stop.send(()).unwrap();
    task.await.unwrap();
}
