//! The tunnel frame codec, as either end reads a WebSocket binary message: `decode` and the
//! borrowed fast path agree, a decoded frame re-encodes to something that decodes to the same
//! frame, and an RPC payload goes through the tarpc decoders of both ends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_defs::{Frame, GuestServiceRequest, GuestServiceResponse};
use tunnel::frame::{self, FrameRef};

const MAX: usize = tunnel::frame::DEFAULT_MAX_FRAME;

fuzz_target!(|data: &[u8]| {
    let owned = frame::decode(data, MAX);
    let borrowed = frame::decode_ref(data, MAX);
    match (&owned, &borrowed) {
        (Ok(Frame::Rpc(a)), Ok(FrameRef::Rpc(b))) => assert_eq!(a.as_slice(), b.as_ref()),
        (Ok(a), Ok(FrameRef::Other(b))) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("decode and decode_ref disagree: {owned:?} vs {borrowed:?}"),
    }
    let Ok(frame) = owned else { return };
    let again = frame::encode(&frame).expect("a decoded frame encodes");
    assert_eq!(frame::decode(&again, usize::MAX).as_ref(), Ok(&frame));
    if let Frame::Rpc(payload) = &frame {
        let _ = frame::decode_payload::<tarpc::ClientMessage<GuestServiceRequest>>(payload);
        let _ = frame::decode_payload::<tarpc::Response<GuestServiceResponse>>(payload);
    }
});
