//! Sans-IO CBOR codec for tunnel frames: one WebSocket binary message holds exactly one
//! CBOR-encoded [`Frame`]; RPC frames carry one CBOR-encoded tarpc message inside.
//!
//! Sizes are checked before any parsing, trailing bytes are an error, and no input makes
//! the decoder panic (see the property tests below).
//!
//! RPC frames, the hot path, are read and written without a second CBOR pass: the envelope
//! `{"Rpc": bytes}` is a fixed prefix and a byte-string header ([`decode_ref`] borrows the
//! payload, [`encode_rpc`] writes the prefix). Anything else, including RPC frames encoded
//! another valid way, goes through the full decoder.

use std::borrow::Cow;

use rpc_defs::{CloseCode, Frame};
use serde::{Serialize, de::DeserializeOwned};

/// Default largest frame either side may send (1 MiB; docs/protocol.md, "Limits and timers").
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Default largest frame a guest may send the KBS: its answers and tokens are small.
pub const DEFAULT_MAX_GUEST_FRAME: usize = 256 << 10;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame is over the size limit (close code 4413).
    #[error("frame of {size} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Size of the offending frame.
        size: usize,
        /// Limit in force.
        max: usize,
    },
    /// The bytes are not one well-formed CBOR item of the expected shape (close code 4400).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The value could not be serialized (a bug on our side, not the peer's).
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl CodecError {
    /// The WebSocket close code a peer that sent this gets.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::TooLarge { .. } => CloseCode::FrameTooLarge,
            Self::Malformed(_) | Self::Encode(_) => CloseCode::Protocol,
        }
    }
}

/// Encodes a frame as one CBOR item.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, CodecError> {
    to_cbor(frame)
}

/// Encodes a frame as one CBOR item of at most `max_frame` bytes (the peer's limit).
pub fn encode_within(frame: &Frame, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let bytes = to_cbor(frame)?;
    check_size(bytes.len(), max_frame)?;
    Ok(bytes)
}

/// Decodes one frame, refusing anything over `max_frame` bytes before parsing it.
pub fn decode(bytes: &[u8], max_frame: usize) -> Result<Frame, CodecError> {
    Ok(match decode_ref(bytes, max_frame)? {
        FrameRef::Rpc(payload) => Frame::Rpc(payload.into_owned()),
        FrameRef::Other(frame) => frame,
    })
}

/// A decoded frame whose RPC payload still lies in the received message.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    /// [`Frame::Rpc`]'s payload, borrowed when the frame is `{"Rpc": <definite-length byte
    /// string>}` with that exact key encoding (what [`encode_rpc`] writes), copied otherwise.
    Rpc(Cow<'a, [u8]>),
    /// Any other frame (never [`Frame::Rpc`]).
    Other(Frame),
}

/// Like [`decode`], without copying an RPC payload out of `bytes`.
pub fn decode_ref(bytes: &[u8], max_frame: usize) -> Result<FrameRef<'_>, CodecError> {
    check_size(bytes.len(), max_frame)?;
    if let Some(payload) = rpc_payload(bytes) {
        return Ok(FrameRef::Rpc(Cow::Borrowed(payload)));
    }
    Ok(match from_cbor(bytes)? {
        Frame::Rpc(payload) => FrameRef::Rpc(Cow::Owned(payload)),
        other => FrameRef::Other(other),
    })
}

/// CBOR of `{"Rpc": ...}`: a map of one entry whose key is the 3-byte text "Rpc".
const RPC_PREFIX: [u8; 5] = [0xa1, 0x63, b'R', b'p', b'c'];

/// The payload of an RPC frame written as `{"Rpc": <definite-length byte string>}` (any
/// length-header width, so what [`encode_rpc`] writes and more), or `None` for any other
/// input, which the full decoder then judges.
fn rpc_payload(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(&RPC_PREFIX)?;
    let (&first, rest) = rest.split_first()?;
    if first >> 5 != 2 {
        return None; // not a byte string
    }
    let (len, body) = match first & 0x1f {
        n @ 0..=23 => (u64::from(n), rest),
        24 => (u64::from(*rest.first()?), rest.get(1..)?),
        25 => (
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            rest.get(2..)?,
        ),
        26 => (
            u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
            rest.get(4..)?,
        ),
        27 => (
            u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
            rest.get(8..)?,
        ),
        _ => return None, // indefinite length or reserved
    };
    (u64::try_from(body.len()).ok()? == len).then_some(body)
}

/// Encodes `msg` as CBOR and wraps it in [`Frame::Rpc`], ready to send; fails with
/// [`CodecError::TooLarge`] when the whole frame would exceed `max_frame`.
pub fn encode_rpc<T: Serialize>(msg: &T, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let payload = to_cbor(msg)?;
    // The envelope adds at most 14 bytes; checking the payload first avoids a big copy.
    check_size(payload.len(), max_frame)?;
    let mut bytes = Vec::with_capacity(payload.len() + 14);
    bytes.extend_from_slice(&RPC_PREFIX);
    push_bytes_header(&mut bytes, payload.len());
    bytes.extend_from_slice(&payload);
    check_size(bytes.len(), max_frame)?;
    Ok(bytes)
}

/// Decodes the payload of a [`Frame::Rpc`] as one CBOR item of type `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    from_cbor(payload)
}

/// The shortest CBOR header of a byte string of `len` bytes.
fn push_bytes_header(out: &mut Vec<u8>, len: usize) {
    if let Ok(n) = u8::try_from(len) {
        if n < 24 {
            out.push(0x40 + n);
        } else {
            out.extend_from_slice(&[0x58, n]);
        }
    } else if let Ok(n) = u16::try_from(len) {
        out.push(0x59);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(len) {
        out.push(0x5a);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0x5b);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

fn check_size(size: usize, max: usize) -> Result<(), CodecError> {
    if size > max {
        return Err(CodecError::TooLarge { size, max });
    }
    Ok(())
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Sized for a small message in one allocation; larger ones grow as usual.
    let mut out = Vec::with_capacity(512);
    ciborium::ser::into_writer(value, &mut out).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut rest = bytes;
    let value = ciborium::de::from_reader(&mut rest)
        .map_err(|e: ciborium::de::Error<std::io::Error>| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the CBOR item",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rpc_defs::GuestInfo;

    fn arb_string() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(version, challenge, heartbeat_s, max_frame)| {
                    Frame::Hello {
                        version,
                        challenge,
                        heartbeat_s,
                        max_frame,
                    }
                }),
            (
                proptest::collection::vec(any::<u8>(), 0..64),
                arb_string(),
                arb_string(),
                proptest::collection::vec(arb_string(), 0..4)
            )
                .prop_map(|(nonce, instance_id, daemon_version, services)| {
                    Frame::Proof {
                        nonce,
                        info: GuestInfo {
                            instance_id,
                            daemon_version,
                            services,
                        },
                    }
                }),
            (arb_string(), arb_string(), any::<u64>()).prop_map(
                |(session_id, guest_id, reauth_before)| Frame::Welcome {
                    session_id,
                    guest_id,
                    reauth_before
                }
            ),
            (any::<u16>(), arb_string()).prop_map(|(code, reason)| Frame::Reject { code, reason }),
            proptest::collection::vec(any::<u8>(), 0..2000).prop_map(Frame::Rpc),
            arb_string().prop_map(|token| Frame::Reauth { token }),
            any::<u64>().prop_map(|reauth_before| Frame::ReauthOk { reauth_before }),
            any::<u64>().prop_map(|reconnect_after_ms| Frame::GoAway { reconnect_after_ms }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(frame in arb_frame()) {
            let bytes = encode(&frame).expect("encode");
            prop_assert_eq!(decode(&bytes, DEFAULT_MAX_FRAME).expect("decode"), frame);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, DEFAULT_MAX_FRAME);
            let _ = decode_payload::<tarpc::Response<rpc_defs::GuestServiceResponse>>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(
            frame in arb_frame(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode(&frame).expect("encode");
            for (at, value) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= value;
                }
            }
            let _ = decode(&bytes, DEFAULT_MAX_FRAME);
        }

        #[test]
        fn rpc_envelope_is_what_ciborium_writes(
            payload in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..24),
                proptest::collection::vec(any::<u8>(), 24..256),
                proptest::collection::vec(any::<u8>(), 256..1024),
                (65_530_usize..65_540).prop_map(|n| vec![0xab_u8; n]),
            ],
        ) {
            // encode_rpc's hand-written envelope, byte for byte the derived encoding, for a
            // payload of each header width.
            let inner = to_cbor(&serde_bytes::ByteBuf::from(payload.clone())).expect("inner");
            let ours = encode_rpc(&serde_bytes::ByteBuf::from(payload), usize::MAX).expect("encode");
            prop_assert_eq!(&ours, &encode(&Frame::Rpc(inner.clone())).expect("derived"));
            prop_assert_eq!(decode_ref(&ours, usize::MAX).expect("decode"), FrameRef::Rpc(Cow::Borrowed(&inner[..])));
        }

        #[test]
        fn truncated_frames_are_malformed(frame in arb_frame(), cut in any::<usize>()) {
            let bytes = encode(&frame).expect("encode");
            let cut = cut % bytes.len();
            prop_assert!(matches!(decode(&bytes[..cut], DEFAULT_MAX_FRAME), Err(CodecError::Malformed(_))));
        }
    }

    /// `{"Rpc": payload}` with the byte string's length written in `width` extra bytes (0:
    /// in the initial byte; 1, 2, 4, 8), shortest or not: every header the fast path reads.
    fn rpc_with_header_width(payload: &[u8], width: u8) -> Vec<u8> {
        let len = payload.len() as u64;
        let mut bytes = RPC_PREFIX.to_vec();
        match width {
            0 => bytes.push(0x40 | u8::try_from(len).expect("short")),
            1 => bytes.extend([0x58, u8::try_from(len).expect("fits")]),
            2 => {
                bytes.push(0x59);
                bytes.extend(u16::try_from(len).expect("fits").to_be_bytes());
            }
            4 => {
                bytes.push(0x5a);
                bytes.extend(u32::try_from(len).expect("fits").to_be_bytes());
            }
            _ => {
                bytes.push(0x5b);
                bytes.extend(len.to_be_bytes());
            }
        }
        bytes.extend_from_slice(payload);
        bytes
    }

    /// The same payload as indefinite-length chunks: a valid RPC frame only the full
    /// decoder reads.
    fn rpc_in_chunks(payload: &[u8]) -> Vec<u8> {
        let mut bytes = RPC_PREFIX.to_vec();
        bytes.push(0x5f);
        for chunk in payload.chunks(7) {
            bytes.push(0x40 | chunk.len() as u8);
            bytes.extend_from_slice(chunk);
        }
        bytes.push(0xff);
        bytes
    }

    #[derive(Debug, Clone)]
    enum Damage {
        None,
        /// XOR one of the first 16 bytes (prefix, header, start of the payload).
        Flip(usize, u8),
        /// Drop the last bytes.
        Cut(usize),
        /// Append bytes (a declared length that is now short).
        Extend(Vec<u8>),
    }

    fn arb_damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            3 => Just(Damage::None),
            2 => (0_usize..16, 1_u8..=255).prop_map(|(at, x)| Damage::Flip(at, x)),
            1 => (1_usize..4).prop_map(Damage::Cut),
            1 => proptest::collection::vec(any::<u8>(), 1..3).prop_map(Damage::Extend),
        ]
    }

    /// The fast path and the full decoder are two readers of one format: on valid RPC
    /// frames (shortest headers, longer ones, chunked) and on those frames damaged, they
    /// agree; and the generator reaches every branch (checked below), so the property
    /// cannot hold because nothing was compared.
    #[test]
    fn the_rpc_fast_path_agrees_with_the_full_decoder() {
        use proptest::test_runner::{Config, TestRunner};
        use std::cell::Cell;

        let input = (
            // Half short enough for the length to fit the first byte.
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..24),
                proptest::collection::vec(any::<u8>(), 24..300),
            ],
            prop_oneof![Just(0_u8), Just(1), Just(2), Just(4), Just(8), Just(0xff)],
            arb_damage(),
        )
            .prop_map(|(payload, width, damage)| {
                let (mut bytes, width) = match width {
                    0xff => (rpc_in_chunks(&payload), None),
                    // A width too small for the length falls back to the next that fits.
                    0 if payload.len() < 24 => (rpc_with_header_width(&payload, 0), Some(0)),
                    0 | 1 if payload.len() < 256 => (rpc_with_header_width(&payload, 1), Some(1)),
                    w => (rpc_with_header_width(&payload, w.max(2)), Some(w.max(2))),
                };
                let intact = matches!(damage, Damage::None);
                match damage {
                    Damage::None => {}
                    Damage::Flip(at, x) => {
                        if let Some(b) = bytes.get_mut(at) {
                            *b ^= x;
                        }
                    }
                    Damage::Cut(n) => bytes.truncate(bytes.len().saturating_sub(n)),
                    Damage::Extend(tail) => bytes.extend(tail),
                }
                (bytes, width, intact)
            });

        let (fast, non_shortest, full_rpc, full_other, refused) = (
            Cell::new(0_u32),
            Cell::new(0_u32),
            Cell::new(0_u32),
            Cell::new(0_u32),
            Cell::new(0_u32),
        );
        // Intact frames the fast path took, by header width (0: length in the first byte).
        let by_width: [Cell<u32>; 9] = Default::default();
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&input, |(bytes, width, intact)| {
                let full = from_cbor::<Frame>(&bytes);
                match (rpc_payload(&bytes), &full) {
                    (Some(payload), _) => {
                        fast.set(fast.get() + 1);
                        if encode(&Frame::Rpc(payload.to_vec())).expect("encode") != bytes {
                            non_shortest.set(non_shortest.get() + 1);
                        }
                        prop_assert_eq!(&full, &Ok(Frame::Rpc(payload.to_vec())));
                    }
                    (None, Ok(Frame::Rpc(_))) => full_rpc.set(full_rpc.get() + 1),
                    (None, Ok(_)) => full_other.set(full_other.get() + 1),
                    (None, Err(_)) => refused.set(refused.get() + 1),
                }
                // Every intact definite-length frame, whatever its header width, is read in
                // place: the payload borrowed from the message, never copied.
                if let (true, Some(width)) = (intact, width) {
                    prop_assert!(
                        matches!(
                            decode_ref(&bytes, usize::MAX),
                            Ok(FrameRef::Rpc(Cow::Borrowed(_)))
                        ),
                        "width {} not borrowed",
                        width
                    );
                    let hits = &by_width[usize::from(width)];
                    hits.set(hits.get() + 1);
                }
                // Whichever path takes it, decode_ref answers what the full decoder does.
                let ours = decode_ref(&bytes, usize::MAX).map(|f| match f {
                    FrameRef::Rpc(p) => Frame::Rpc(p.into_owned()),
                    FrameRef::Other(other) => other,
                });
                prop_assert_eq!(ours.is_ok(), full.is_ok());
                if let (Ok(ours), Ok(full)) = (ours, full) {
                    prop_assert_eq!(ours, full);
                }
                Ok(())
            })
            .expect("the fast path and the full decoder agree");

        for width in [0_usize, 1, 2, 4, 8] {
            assert!(
                by_width[width].get() >= 20,
                "intact frames with a {width}-byte length header: {}",
                by_width[width].get()
            );
        }
        let counts = [
            ("fast path", fast.get(), 600),
            ("fast path, non-shortest header", non_shortest.get(), 300),
            ("full decoder, RPC frame", full_rpc.get(), 100),
            ("refused by both", refused.get(), 200),
        ];
        for (branch, hits, at_least) in counts {
            assert!(
                hits >= at_least,
                "{branch} reached {hits} times in 2000 cases (fewer than {at_least}): {counts:?}, other frames {}",
                full_other.get()
            );
        }
    }

    #[test]
    fn size_is_checked_before_parsing() {
        // Garbage that is also too large reports the size, proving nothing was parsed.
        let big = vec![0xff_u8; 2048];
        assert_eq!(
            decode(&big, 1024),
            Err(CodecError::TooLarge {
                size: 2048,
                max: 1024
            })
        );
        assert_eq!(
            decode(&big, 1024).map_err(|e| e.close_code()),
            Err(CloseCode::FrameTooLarge)
        );
    }

    #[test]
    fn encode_within_refuses_a_frame_over_the_peers_limit() {
        let frame = Frame::Rpc(vec![1; 100]);
        let size = encode(&frame).expect("encode").len();
        assert_eq!(encode_within(&frame, size).expect("fits").len(), size);
        assert_eq!(
            encode_within(&frame, size - 1),
            Err(CodecError::TooLarge {
                size,
                max: size - 1
            })
        );
        // The same boundary for the RPC envelope and for decoding.
        let msg = serde_bytes::ByteBuf::from(vec![2_u8; 300]);
        let bytes = encode_rpc(&msg, usize::MAX).expect("encode");
        assert_eq!(encode_rpc(&msg, bytes.len()).expect("fits"), bytes);
        assert!(matches!(
            encode_rpc(&msg, bytes.len() - 1),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(decode(&bytes, bytes.len()).is_ok());
        assert_eq!(
            decode(&bytes, bytes.len() - 1),
            Err(CodecError::TooLarge {
                size: bytes.len(),
                max: bytes.len() - 1
            })
        );
        assert_eq!(
            CodecError::Encode("x".into()).close_code(),
            CloseCode::Protocol
        );
        assert_eq!(
            CodecError::Malformed("x".into()).close_code(),
            CloseCode::Protocol
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Frame::GoAway {
            reconnect_after_ms: 5,
        })
        .expect("encode");
        bytes.push(0);
        let err = decode(&bytes, DEFAULT_MAX_FRAME).expect_err("trailing byte accepted");
        assert_eq!(err.close_code(), CloseCode::Protocol);
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate_or_panic() {
        // {"Rpc": bytes(len = 2^63)} with no body.
        let mut bytes = vec![0xa1, 0x63, b'R', b'p', b'c', 0x5b];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(matches!(
            decode(&bytes, DEFAULT_MAX_FRAME),
            Err(CodecError::Malformed(_))
        ));
        // Deeply nested arrays hit the recursion limit, not the stack.
        let nested = vec![0x81_u8; 100_000];
        assert!(decode(&nested, DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn an_rpc_frame_in_another_valid_encoding_still_decodes() {
        // {"Rpc": bytes in two indefinite-length chunks}: the full decoder's path.
        let bytes = [
            0xa1, 0x63, b'R', b'p', b'c', 0x5f, 0x42, 1, 2, 0x41, 3, 0xff,
        ];
        assert_eq!(rpc_payload(&bytes), None);
        assert_eq!(
            decode_ref(&bytes, DEFAULT_MAX_FRAME),
            Ok(FrameRef::Rpc(Cow::Owned(vec![1, 2, 3])))
        );
        // A declared length that disagrees with the message is refused, not trusted.
        let short = [0xa1, 0x63, b'R', b'p', b'c', 0x43, 1, 2];
        assert_eq!(rpc_payload(&short), None);
        assert!(matches!(
            decode_ref(&short, DEFAULT_MAX_FRAME),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn rpc_envelope_round_trips_and_checks_size() {
        let msg: tarpc::Response<u32> = tarpc::Response {
            request_id: 7,
            message: Ok(42),
        };
        let bytes = encode_rpc(&msg, DEFAULT_MAX_FRAME).expect("encode");
        let Frame::Rpc(payload) = decode(&bytes, DEFAULT_MAX_FRAME).expect("decode") else {
            panic!("not an Rpc frame");
        };
        let back: tarpc::Response<u32> = decode_payload(&payload).expect("payload");
        assert_eq!(back, msg);

        let big = serde_bytes::ByteBuf::from(vec![1_u8; 5000]);
        assert!(matches!(
            encode_rpc(&big, 4096),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
