//! Both sides of the tunnel handshake fed frames a peer chose: the server after its Hello, the
//! guest from its first frame on (its unseal callback hands back fuzzer-chosen bytes, as a
//! hostile KBS's challenge would open to).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_defs::GuestInfo;
use tunnel::frame;
use tunnel::handshake::{GuestHandshake, GuestStep, ServerHandshake, ServerHandshakeParams};

const MAX: usize = tunnel::frame::DEFAULT_MAX_FRAME;

fn info() -> GuestInfo {
    GuestInfo {
        instance_id: "fuzz".into(),
        daemon_version: "0".into(),
        services: vec!["resources".into()],
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many of the following bytes the guest's unseal returns (0..=255, so
    // 32 and 64, the valid lengths, are reached); the rest is a sequence of frames, each
    // prefixed by a 2-byte big-endian length.
    let Some((&opened_len, mut rest)) = data.split_first() else {
        return;
    };
    let mut frames = Vec::new();
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        frames.push(&body[..take]);
        rest = &body[take..];
    }

    let mut server = ServerHandshake::new(
        b"challenge".to_vec(),
        [7u8; tunnel::handshake::NONCE_LEN],
        ServerHandshakeParams {
            guest_id: "g".into(),
            session_id: "s".into(),
            heartbeat_s: 30,
            max_frame: 1 << 20,
            reauth_before: 1,
        },
    );
    let _ = server.hello();
    if let Some(Ok(first)) = frames.first().map(|f| frame::decode(f, MAX)) {
        let _ = server.receive(first);
    }

    let opened: Vec<u8> = rest
        .iter()
        .copied()
        .cycle()
        .take(usize::from(opened_len))
        .collect();
    let mut guest = GuestHandshake::new(info(), move |_challenge: &[u8]| Ok(opened));
    for bytes in &frames {
        let Ok(f) = frame::decode(bytes, MAX) else {
            break;
        };
        match guest.receive(f) {
            Ok(GuestStep::Send(_)) => {}
            Ok(GuestStep::Established(_)) | Err(_) => break,
        }
    }
});
