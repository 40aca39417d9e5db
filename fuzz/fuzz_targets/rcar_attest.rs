//! `POST /kbs/v0/attest`: the body as the handler parses it (`kbs_types::Attestation` from
//! JSON), then `RcarService::attest` on a live challenge: the TEE key check, init-data, the
//! runtime-data binding and the sample verifier's evidence parsing. The nonce is set to the
//! challenge's (a fuzzer cannot guess a random one) unless the input says to keep its own.
#![no_main]

use std::sync::{Arc, OnceLock};

use kbs_core::attest::{RcarConfig, RcarService};
use kbs_core::token::TokenSigner;
use libfuzzer_sys::fuzz_target;

struct Session {
    rt: tokio::runtime::Runtime,
    rcar: RcarService,
    cookie: String,
    nonce: String,
}

fn session() -> &'static Session {
    static SESSION: OnceLock<Session> = OnceLock::new();
    SESSION.get_or_init(|| {
        let rcar = RcarService::new(
            RcarConfig::default(),
            Arc::new(TokenSigner::ephemeral().expect("signing key")),
            vec![Arc::new(kbs_core::attest::SampleVerifier)],
            &[7u8; 32],
        );
        let req: kbs_types::Request = serde_json::from_value(serde_json::json!({
            "version": "0.4.0", "tee": "sample", "extra-params": ""
        }))
        .expect("request");
        let reply = rcar.auth(req).expect("challenge");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        Session {
            rt,
            cookie: reply.session_id,
            nonce: reply.challenge.nonce,
            rcar,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let Ok(mut att) = serde_json::from_slice::<kbs_types::Attestation>(body) else {
        return;
    };
    let s = session();
    if mode & 1 == 0 {
        att.runtime_data.nonce = s.nonce.clone();
    }
    let _ = s.rt.block_on(s.rcar.attest(&s.cookie, att));
});
