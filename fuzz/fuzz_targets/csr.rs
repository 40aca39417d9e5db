//! The pki plugin's CSR parser (`POST /kbs/v0/pki/sign`): PEM or base64 DER, then PKCS#10
//! parsing, the key type, the self-signature and the requested names against an identity.
#![no_main]

use kbs_core::identity::GuestIdentity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let identity = GuestIdentity {
        guest_id: "web-1".into(),
        name: Some("web-1.example".into()),
        ip: Some(std::net::IpAddr::from([10, 0, 0, 1])),
        ..Default::default()
    };
    // The raw bytes as DER, and as the text of the request's `csr` field.
    let _ = kbs_plugin_pki::csr::check(data, &identity);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(der) = kbs_plugin_pki::csr::decode(text) {
            let _ = kbs_plugin_pki::csr::check(&der, &identity);
        }
    }
});
