//! Init-data as the attestation carries it: `{"format": "toml", "body": <toml>}`, parsed,
//! size-checked and turned into the guest's identity and claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let init: kbs_types::InitData = serde_json::from_value(serde_json::json!({
        "format": "toml", "body": body
    }))
    .expect("init-data shape");
    let _ = kbs_core::init_data::parse(&init, 64 * 1024);
});
