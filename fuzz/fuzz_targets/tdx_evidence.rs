//! TDX evidence as the verifier reads it: the wire JSON (`{"quote": b64, "cc_eventlog": b64}`)
//! decoded, the quote parsed (our parser, the embedded PCK chain, dcap-qvl's verification
//! against the test collateral) and the CC event log parsed and replayed.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use tee_verifiers::collateral::TdxCollateral;
use tee_verifiers::tdx::{self, eventlog::EventLog, quote::Quote};
use tee_verifiers::{Collateral, Decoded, TeeKind};

const COLLATERAL: &[u8] =
    include_bytes!("../../server/tee-verifiers/testdata/tdx/tdx_quote_collateral.json");

fn collateral() -> &'static (Collateral, SystemTime) {
    static C: OnceLock<(Collateral, SystemTime)> = OnceLock::new();
    C.get_or_init(|| {
        let c = TdxCollateral::from_json(COLLATERAL).expect("test collateral");
        let mid = c.not_before + (c.not_after - c.not_before) / 2;
        let now = UNIX_EPOCH + Duration::from_secs(mid as u64);
        (Collateral::Tdx(Arc::new(c)), now)
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte picks what the rest is: a raw quote, an event log, or the wire JSON.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(q) = Quote::parse(rest) {
                let _ = q.signed_len();
                let _ = q.body.report_data();
            }
            let _ = tdx::embedded_certs(rest);
            let _ = tdx::pck_info(rest);
            let evidence = serde_json::json!({"quote": STANDARD.encode(rest), "cc_eventlog": null});
            verify(&evidence);
        }
        1 => {
            if let Ok(log) = EventLog::parse(rest) {
                for i in 0..4 {
                    let _ = log.replay_rtmr(i);
                }
                let _ = log.to_claims();
            }
        }
        _ => {
            if let Ok(evidence) = serde_json::from_slice::<serde_json::Value>(rest) {
                verify(&evidence);
            }
        }
    }
});

fn verify(evidence: &serde_json::Value) {
    let Ok(decoded) = Decoded::new(TeeKind::Tdx, evidence) else {
        return;
    };
    let _ = decoded.collateral_request();
    let (collateral, now) = collateral();
    let _ = decoded.verify(&[0u8; 64], None, collateral, *now);
}
