//! What a guest daemon does with a push from the KBS: `apply_resource` (a `SealedResource`)
//! and `install_credentials` (a `CredentialBundle`), decoded from CBOR as they arrive in a
//! tarpc request, with the JWE opened by the guest's TEE key. Mode 2 seals the fuzzer's bytes
//! to the guest's real key, so the bundle plaintext decoding (a CBOR map name -> bytes) runs.
#![no_main]

use std::sync::{Arc, OnceLock};

use guest_daemon::service::GuestDaemonService;
use guest_daemon::store::StateStore;
use guest_daemon::tee_key::TeeKeyPair;
use libfuzzer_sys::fuzz_target;
use rpc_defs::{CredentialBundle, CredentialFile, SealedResource};

struct Guest {
    rt: tokio::runtime::Runtime,
    key: TeeKeyPair,
    svc: GuestDaemonService,
    _dir: tempfile::TempDir,
}

fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(StateStore::open(dir.path().join("state")).expect("state store"));
        let key = store
            .load_or_create_tee_key(TeeKeyPair::new_ec)
            .expect("tee key");
        let svc = GuestDaemonService::new(store, key.clone(), None);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Guest {
            rt,
            key,
            svc,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let g = guest();
    match mode % 3 {
        0 => {
            if let Ok(r) = ciborium::from_reader::<SealedResource, _>(body) {
                let _ = g.rt.block_on(g.svc.apply(r));
            }
        }
        1 => {
            if let Ok(b) = ciborium::from_reader::<CredentialBundle, _>(body) {
                let _ = g.rt.block_on(g.svc.install(b));
            }
        }
        _ => {
            let Ok(sealed) = kbs_core::jwe::seal(&g.key.export_pubkey(), body) else {
                return;
            };
            let bundle = CredentialBundle {
                id: "fuzz".into(),
                version: 1 + u64::from(body.first().copied().unwrap_or(0)),
                files: vec![
                    CredentialFile {
                        name: "cert.pem".into(),
                        mode: 0o644,
                    },
                    CredentialFile {
                        name: "key.pem".into(),
                        mode: 0o600,
                    },
                ],
                jwe: serde_json::to_vec(&sealed).expect("JWE JSON"),
                not_after: u64::MAX,
            };
            let _ = g.rt.block_on(g.svc.install(bundle));
        }
    }
});
