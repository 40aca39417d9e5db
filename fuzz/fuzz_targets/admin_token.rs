//! Bearer tokens as a peer sends them: the admin JWT (`AdminAuth::authorize`: header, alg,
//! key id, claims, role rules) and the attestation token (`TokenSigner::verify`). The key is
//! fixed so checked-in seeds carry valid signatures.
#![no_main]

use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderValue, Method};
use kbs_core::admin_key::AdminKeyPair;
use kbs_core::token::TokenSigner;
use kbs_web::admin_auth::{AdminAuth, AdminConfig};
use libfuzzer_sys::fuzz_target;

/// A key for fuzzing only (seeds in seeds/admin_token are signed with it).
const FUZZ_ADMIN_KEY: &str = include_str!("../seeds/admin.key");

struct Verifiers {
    admin: AdminAuth,
    signer: Arc<TokenSigner>,
}

fn verifiers() -> &'static Verifiers {
    static V: OnceLock<Verifiers> = OnceLock::new();
    V.get_or_init(|| {
        let key = AdminKeyPair::from_pem(FUZZ_ADMIN_KEY, "fuzz").expect("fuzz admin key");
        let admin = AdminAuth::new(
            &AdminConfig::default(),
            Some(("dev", key.public_pem().as_bytes())),
        )
        .expect("admin auth");
        Verifiers {
            admin,
            signer: Arc::new(TokenSigner::ephemeral().expect("signing key")),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let v = verifiers();
    let _ = v.signer.verify(token);
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    for (method, path) in [
        (Method::GET, "/kbs/v0/admin/audit"),
        (Method::POST, "/kbs/v0/resource/default/key/one"),
    ] {
        let _ = v.admin.authorize(&headers, &method, path);
    }
});
