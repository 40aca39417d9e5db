//! Sans-IO CBOR codec for tunnel frames: one WebSocket binary message holds exactly one
//! CBOR-encoded [`Frame`]; RPC frames carry one CBOR-encoded tarpc message inside.
//!
//! Sizes are checked before any parsing, trailing bytes are an error, and no input makes
//! the decoder panic (see the property tests below).

use rpc_defs::{CloseCode, Frame};
use serde::{Serialize, de::DeserializeOwned};

/// Default largest frame either side may send (PROTOCOL.md: 1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

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

/// Decodes one frame, refusing anything over `max_frame` bytes before parsing it.
pub fn decode(bytes: &[u8], max_frame: usize) -> Result<Frame, CodecError> {
    check_size(bytes.len(), max_frame)?;
    from_cbor(bytes)
}

/// Encodes `msg` as CBOR and wraps it in [`Frame::Rpc`], ready to send; fails with
/// [`CodecError::TooLarge`] when the whole frame would exceed `max_frame`.
pub fn encode_rpc<T: Serialize>(msg: &T, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let payload = to_cbor(msg)?;
    // The envelope adds a few bytes; checking the payload first avoids a second big copy.
    check_size(payload.len(), max_frame)?;
    let bytes = encode(&Frame::Rpc(payload))?;
    check_size(bytes.len(), max_frame)?;
    Ok(bytes)
}

/// Decodes the payload of a [`Frame::Rpc`] as one CBOR item of type `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    from_cbor(payload)
}

fn check_size(size: usize, max: usize) -> Result<(), CodecError> {
    if size > max {
        return Err(CodecError::TooLarge { size, max });
    }
    Ok(())
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
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
        fn truncated_frames_are_malformed(frame in arb_frame(), cut in any::<usize>()) {
            let bytes = encode(&frame).expect("encode");
            let cut = cut % bytes.len();
            prop_assert!(matches!(decode(&bytes[..cut], DEFAULT_MAX_FRAME), Err(CodecError::Malformed(_))));
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
