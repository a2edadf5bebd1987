//! Any byte stream through the frame decoder and every message decoder
//! yields frames, messages or typed errors, never a panic; whatever decodes
//! re-encodes to a frame that decodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use weir_protocol::frame::FRAME_BYTES_MAX_DEFAULT;
use weir_protocol::message::SubscriptionPush;
use weir_protocol::{FrameDecoder, FrameKind, Request, Response};

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(frame)) = decoder.decode(&mut buffer) {
        let header = frame.header;
        match header.kind {
            FrameKind::Request => {
                if let Ok(request) = Request::decode_body(header.api_key, header.api_version, frame.body) {
                    let again = request.encode(header.correlation_id).to_vec();
                    let mut again = BytesMut::from(&again[..]);
                    let frame = decoder.decode(&mut again).expect("re-encoded frame").expect("whole");
                    let decoded = Request::decode_body(frame.header.api_key, 0, frame.body).expect("re-decodes");
                    assert_eq!(decoded, request);
                }
            }
            FrameKind::Response => {
                let _ = Response::decode_body(header.api_key, header.api_version, frame.body);
            }
            FrameKind::Push => {
                let _ = SubscriptionPush::decode(frame.body);
            }
        }
    }
});
