//! tarpc over the tunnel: the transport handed to tarpc (a pair of bounded queues to the
//! socket task), frame encoding on the tarpc side, and the checks that keep a guest's
//! answers honest.
//!
//! Each tarpc message travels as `Frame::Rpc(<CBOR of the message>)`. The tarpc side
//! encodes in `start_send`, so an argument too large for a frame fails only its own call.

use std::{
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant as StdInstant},
};

use bytes::Bytes;
use futures::{
    Sink, Stream,
    channel::mpsc::{self, Receiver, Sender},
};
use rpc_defs::{GuestServiceRequest, GuestServiceResponse};
use serde::{Deserialize, Serialize};
use tarpc::{ClientMessage, Request, Response, ServerError};

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

/// Turns a tarpc message into an encoded frame.
pub(crate) trait Encode<T> {
    fn encode(&self, item: T) -> Result<Bytes, TransportError>;
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

impl Encode<Response<GuestServiceResponse>> for GuestEncoder {
    fn encode(&self, item: Response<GuestServiceResponse>) -> Result<Bytes, TransportError> {
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

/// The transport tarpc runs on: bounded queues to and from the socket task.
pub(crate) struct RpcTransport<In, Out, E> {
    rx: Receiver<In>,
    tx: Sender<Bytes>,
    encoder: E,
    _out: PhantomData<fn(Out)>,
}

/// The socket task's ends of the queues.
pub(crate) struct RpcPipes<In> {
    /// Encoded frames from tarpc.
    pub out_rx: Receiver<Bytes>,
    /// Decoded messages for tarpc.
    pub in_tx: Sender<In>,
    /// Set once tarpc dropped its sending end.
    pub out_closed: bool,
}

/// A transport and the socket task's ends, each direction bounded to `queue` messages.
pub(crate) fn pipes<In, Out, E>(
    queue: usize,
    encoder: E,
) -> (RpcTransport<In, Out, E>, RpcPipes<In>) {
    // futures' bounded channel allocates per message rather than up front, which keeps idle
    // tunnels small; its capacity is `buffer + senders`, hence the `- 1`.
    let buffer = queue.saturating_sub(1);
    let (out_tx, out_rx) = mpsc::channel(buffer);
    let (in_tx, in_rx) = mpsc::channel(buffer);
    (
        RpcTransport {
            rx: in_rx,
            tx: out_tx,
            encoder,
            _out: PhantomData,
        },
        RpcPipes {
            out_rx,
            in_tx,
            out_closed: false,
        },
    )
}

impl<In, Out, E> Stream for RpcTransport<In, Out, E>
where
    E: Unpin,
{
    type Item = Result<In, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx).map(|m| m.map(Ok))
    }
}

impl<In, Out, E> Sink<Out> for RpcTransport<In, Out, E>
where
    E: Encode<Out> + Unpin,
{
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx.poll_ready(cx).map_err(|_| TransportError::Closed)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Out) -> Result<(), Self::Error> {
        let outgoing = self.encoder.encode(item)?;
        self.tx
            .start_send(outgoing)
            .map_err(|_| TransportError::Closed)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Pending while the queue is full, so tarpc waits instead of spinning.
        Pin::new(&mut self.tx)
            .poll_flush(cx)
            .map_err(|_| TransportError::Closed)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.tx)
            .poll_close(cx)
            .map_err(|_| TransportError::Closed)
    }
}

/// Longest deadline a guest honours for one request; longer ones are cut to this.
pub(crate) const MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(3600);

/// Guest side: decodes a KBS message without trusting its deadline (tarpc would panic adding
/// an absurd one to `Instant::now()`); same wire shape as `tarpc::ClientMessage`.
pub(crate) fn decode_client_message(
    payload: &[u8],
) -> Result<ClientMessage<GuestServiceRequest>, CodecError> {
    #[derive(Deserialize)]
    enum Wire {
        Request(WireRequest),
        Cancel {
            #[serde(default)]
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
        }) => {
            let relative = context
                .deadline
                .unwrap_or(Duration::from_secs(10))
                .min(MAX_REQUEST_DEADLINE);
            let mut ctx = tarpc::context::current();
            ctx.deadline = StdInstant::now() + relative;
            ctx.trace_context = context.trace_context;
            ClientMessage::Request(Request {
                context: ctx,
                id,
                message,
            })
        }
        Wire::Cancel {
            trace_context,
            request_id,
        } => ClientMessage::Cancel {
            trace_context,
            request_id,
        },
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
        let back = decode_client_message(&payload_of(&bytes)).expect("decode");
        let ClientMessage::Request(req) = back else {
            panic!("not a request");
        };
        assert_eq!(req.id, 3);
        let left = req
            .context
            .deadline
            .saturating_duration_since(StdInstant::now());
        assert!(left > Duration::from_secs(5) && left <= Duration::from_secs(7));
        assert!(
            matches!(req.message, GuestServiceRequest::Ping { ref payload } if payload.as_ref() == [1, 2, 3])
        );

        let bytes = encode_cancel(9, 1 << 20).expect("encode");
        assert!(matches!(
            decode_client_message(&payload_of(&bytes)),
            Ok(ClientMessage::Cancel { request_id: 9, .. })
        ));
    }

    #[test]
    fn tarpc_itself_decodes_what_the_kbs_encodes() {
        // Wire compatibility with tarpc's own types, not only with our guest decoder.
        let probe = GuestServiceRequest::Probe {
            kind: ProbeKind::Health,
        };
        let bytes = encode_request(11, Duration::from_secs(3), &probe, 1 << 20).expect("encode");
        let msg: ClientMessage<GuestServiceRequest> =
            frame::decode_payload(&payload_of(&bytes)).expect("tarpc decodes it");
        let ClientMessage::Request(req) = msg else {
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
        let msg: ClientMessage<GuestServiceRequest> =
            frame::decode_payload(&payload_of(&bytes)).expect("tarpc decodes it");
        assert!(matches!(msg, ClientMessage::Cancel { request_id: 12, .. }));
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
        let Ok(ClientMessage::Request(req)) = decode_client_message(&bytes) else {
            panic!("not decoded");
        };
        assert!(req.context.deadline <= StdInstant::now() + MAX_REQUEST_DEADLINE);
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
