//! `POST /kbs/v0/auth`: the body as the handler parses it (`kbs_types::Request` from JSON),
//! then `RcarService::auth`, which negotiates the hash and seals the challenge cookie.
#![no_main]

use std::sync::{Arc, OnceLock};

use kbs_core::attest::{RcarConfig, RcarService};
use kbs_core::token::TokenSigner;
use libfuzzer_sys::fuzz_target;

fn rcar() -> &'static RcarService {
    static RCAR: OnceLock<RcarService> = OnceLock::new();
    RCAR.get_or_init(|| {
        RcarService::new(
            RcarConfig::default(),
            Arc::new(TokenSigner::ephemeral().expect("signing key")),
            vec![Arc::new(kbs_core::attest::SampleVerifier)],
            &[7u8; 32],
        )
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<kbs_types::Request>(data) {
        let _ = rcar().auth(req);
    }
});
