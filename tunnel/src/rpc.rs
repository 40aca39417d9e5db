//! tarpc's wire format over the tunnel: requests and cancels encoded by the KBS, decoded by
//! the guest's dispatcher, and answers encoded by the guest.
//!
//! Each tarpc message travels as `Frame::Rpc(<CBOR of the message>)`, encoded by the side
//! that makes the call or answer, so a message too large for a frame fails only its own call.

use std::time::Duration;

use bytes::Bytes;
use rpc_defs::{GuestServiceRequest, GuestServiceResponse};
use serde::{Deserialize, Serialize};
use tarpc::{Response, ServerError};

use crate::frame::{self, CodecError};

/// A `GuestService` method, as a metrics and log label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `ping`
    Ping,
    /// `install_credentials`
    InstallCredentials,
    /// `apply_resource`
    ApplyResource,
    /// `probe`
    Probe,
}

impl Method {
    /// The method's name as in the trait.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::InstallCredentials => "install_credentials",
            Self::ApplyResource => "apply_resource",
            Self::Probe => "probe",
        }
    }

    pub(crate) fn of_response(resp: &GuestServiceResponse) -> Self {
        match resp {
            GuestServiceResponse::Ping(_) => Self::Ping,
            GuestServiceResponse::InstallCredentials(_) => Self::InstallCredentials,
            GuestServiceResponse::ApplyResource(_) => Self::ApplyResource,
            GuestServiceResponse::Probe(_) => Self::Probe,
        }
    }
}

/// Why the tarpc side could not hand a message to the socket task.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The encoded message does not fit in one frame.
    #[error("message of {size} bytes exceeds the {max} byte frame limit")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// Frame limit in force.
        max: usize,
    },
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The tunnel is closed.
    #[error("tunnel closed")]
    Closed,
}

impl From<CodecError> for TransportError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLarge { size, max } => Self::TooLarge { size, max },
            other => Self::Encode(other.to_string()),
        }
    }
}

/// KBS side: encodes a request in tarpc's wire shape (`ClientMessage::Request`) without
/// building tarpc's client context; the deadline travels relative, as tarpc sends it.
pub(crate) fn encode_request(
    id: u64,
    deadline: Duration,
    message: &GuestServiceRequest,
    max_frame: usize,
) -> Result<Bytes, TransportError> {
    let wire = WireOut::Request(WireRequest {
        context: WireContext {
            deadline,
            trace_context: tarpc::trace::Context::default(),
        },
        id,
        message,
    });
    Ok(Bytes::from(frame::encode_rpc(&wire, max_frame)?))
}

/// KBS side: tarpc's `ClientMessage::Cancel` for request `id`.
pub(crate) fn encode_cancel(id: u64, max_frame: usize) -> Result<Bytes, TransportError> {
    let wire: WireOut<'_> = WireOut::Cancel {
        trace_context: tarpc::trace::Context::default(),
        request_id: id,
    };
    Ok(Bytes::from(frame::encode_rpc(&wire, max_frame)?))
}

/// `tarpc::ClientMessage<GuestServiceRequest>` as it is serialized, borrowing the message.
#[derive(Serialize)]
enum WireOut<'a> {
    Request(WireRequest<'a>),
    Cancel {
        trace_context: tarpc::trace::Context,
        request_id: u64,
    },
}

#[derive(Serialize)]
struct WireRequest<'a> {
    context: WireContext,
    id: u64,
    message: &'a GuestServiceRequest,
}

#[derive(Serialize)]
struct WireContext {
    deadline: Duration,
    trace_context: tarpc::trace::Context,
}

/// Guest side: responses to the KBS. A response too large for a frame is replaced by an
/// error response, so the caller learns why instead of the tunnel closing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestEncoder {
    pub max_frame: usize,
}

impl GuestEncoder {
    /// Encodes an answer, substituting an error answer when it is too large.
    pub fn encode(&self, item: Response<GuestServiceResponse>) -> Result<Bytes, TransportError> {
        let request_id = item.request_id;
        let bytes = match frame::encode_rpc(&item, self.max_frame) {
            Ok(bytes) => bytes,
            Err(CodecError::TooLarge { size, max }) => {
                let substitute: Response<GuestServiceResponse> = Response {
                    request_id,
                    message: Err(ServerError::new(
                        std::io::ErrorKind::InvalidData,
                        format!("response of {size} bytes exceeds the {max} byte frame limit"),
                    )),
                };
                frame::encode_rpc(&substitute, self.max_frame)?
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Bytes::from(bytes))
    }
}

/// Longest deadline a guest honours for one request; longer ones are cut to this.
pub(crate) const MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(3600);

/// A message from the KBS, as the guest's dispatcher takes it.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Run `message` within `deadline` (relative, capped at [`MAX_REQUEST_DEADLINE`]).
    Request {
        id: u64,
        deadline: Duration,
        trace_context: tarpc::trace::Context,
        message: GuestServiceRequest,
    },
    /// Stop running request `id`.
    Cancel { id: u64 },
}

/// Guest side: decodes a KBS message (tarpc's `ClientMessage` wire shape) without trusting
/// its deadline: an absurd one is capped rather than added to a clock.
pub(crate) fn decode_incoming(payload: &[u8]) -> Result<Incoming, CodecError> {
    #[derive(Deserialize)]
    enum Wire {
        Request(WireRequest),
        Cancel {
            #[serde(default)]
            #[allow(dead_code)]
            trace_context: tarpc::trace::Context,
            request_id: u64,
        },
    }
    #[derive(Deserialize)]
    struct WireRequest {
        context: WireContext,
        id: u64,
        message: GuestServiceRequest,
    }
    #[derive(Deserialize)]
    struct WireContext {
        #[serde(default)]
        deadline: Option<Duration>,
        trace_context: tarpc::trace::Context,
    }

    Ok(match frame::decode_payload::<Wire>(payload)? {
        Wire::Request(WireRequest {
            context,
            id,
            message,
        }) => Incoming::Request {
            id,
            deadline: context
                .deadline
                .unwrap_or(Duration::from_secs(10))
                .min(MAX_REQUEST_DEADLINE),
            trace_context: context.trace_context,
            message,
        },
        Wire::Cancel { request_id, .. } => Incoming::Cancel { id: request_id },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_defs::ProbeKind;
    use serde_bytes::ByteBuf;

    fn payload_of(bytes: &[u8]) -> Vec<u8> {
        match frame::decode(bytes, usize::MAX) {
            Ok(rpc_defs::Frame::Rpc(p)) => p,
            other => panic!("not an Rpc frame: {other:?}"),
        }
    }

    #[test]
    fn guest_decodes_what_the_kbs_encodes() {
        let ping = GuestServiceRequest::Ping {
            payload: ByteBuf::from(vec![1, 2, 3]),
        };
        let bytes = encode_request(3, Duration::from_secs(7), &ping, 1 << 20).expect("encode");
        let back = decode_incoming(&payload_of(&bytes)).expect("decode");
        let Incoming::Request {
            id,
            deadline,
            message,
            ..
        } = back
        else {
            panic!("not a request");
        };
        assert_eq!(id, 3);
        assert_eq!(deadline, Duration::from_secs(7));
        assert!(
            matches!(message, GuestServiceRequest::Ping { ref payload } if payload.as_ref() == [1, 2, 3])
        );

        let bytes = encode_cancel(9, 1 << 20).expect("encode");
        assert!(matches!(
            decode_incoming(&payload_of(&bytes)),
            Ok(Incoming::Cancel { id: 9 })
        ));
    }

    #[test]
    fn tarpc_itself_decodes_what_the_kbs_encodes() {
        // Wire compatibility with tarpc's own types, not only with our guest decoder.
        let probe = GuestServiceRequest::Probe {
            kind: ProbeKind::Health,
        };
        let bytes = encode_request(11, Duration::from_secs(3), &probe, 1 << 20).expect("encode");
        let msg: tarpc::ClientMessage<GuestServiceRequest> =
            frame::decode_payload(&payload_of(&bytes)).expect("tarpc decodes it");
        let tarpc::ClientMessage::Request(req) = msg else {
            panic!("not a request");
        };
        assert_eq!(req.id, 11);
        assert!(matches!(
            req.message,
            GuestServiceRequest::Probe {
                kind: ProbeKind::Health
            }
        ));
        let bytes = encode_cancel(12, 1 << 20).expect("encode");
        let msg: tarpc::ClientMessage<GuestServiceRequest> =
            frame::decode_payload(&payload_of(&bytes)).expect("tarpc decodes it");
        assert!(matches!(
            msg,
            tarpc::ClientMessage::Cancel { request_id: 12, .. }
        ));
    }

    #[test]
    fn absurd_deadlines_are_capped_not_panicking() {
        // Same shape as tarpc's, with a deadline of u64::MAX seconds.
        #[derive(serde::Serialize)]
        enum Wire {
            Request {
                context: Ctx,
                id: u64,
                message: GuestServiceRequest,
            },
        }
        #[derive(serde::Serialize)]
        struct Ctx {
            deadline: Duration,
            trace_context: tarpc::trace::Context,
        }
        let wire = Wire::Request {
            context: Ctx {
                deadline: Duration::MAX,
                trace_context: tarpc::trace::Context::default(),
            },
            id: 1,
            message: GuestServiceRequest::Probe {
                kind: ProbeKind::Health,
            },
        };
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(&wire, &mut bytes).expect("encode");
        let Ok(Incoming::Request { deadline, .. }) = decode_incoming(&bytes) else {
            panic!("not decoded");
        };
        assert_eq!(deadline, MAX_REQUEST_DEADLINE);
    }

    #[test]
    fn oversize_guest_response_becomes_an_error_response() {
        let enc = GuestEncoder { max_frame: 4096 };
        let big: Response<GuestServiceResponse> = Response {
            request_id: 5,
            message: Ok(GuestServiceResponse::Ping(ByteBuf::from(vec![0; 10_000]))),
        };
        let out = enc.encode(big).expect("substituted");
        let resp: Response<GuestServiceResponse> =
            frame::decode_payload(&payload_of(&out)).expect("decode");
        assert_eq!(resp.request_id, 5);
        assert!(matches!(resp.message, Err(ref e) if e.kind == std::io::ErrorKind::InvalidData));
    }

    #[test]
    fn oversize_kbs_request_fails_alone() {
        let ping = GuestServiceRequest::Ping {
            payload: ByteBuf::from(vec![0; 10_000]),
        };
        assert!(matches!(
            encode_request(1, Duration::from_secs(1), &ping, 4096),
            Err(TransportError::TooLarge { .. })
        ));
    }
}
