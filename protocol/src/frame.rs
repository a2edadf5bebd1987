//! Frames: the unit on the wire.
//!
//! ```text
//! length       u32  bytes after this field (header + body)
//! kind         u8   0 request, 1 response, 2 push
//! api_key      u16
//! api_version  u16
//! correlation  u32  request: chosen by the client; response: the request's;
//!                   push: the subscription id
//! flags        u16  reserved, 0
//! body         …    the message, as its API and version define it
//! ```
//! All integers are big-endian. [`FrameDecoder`] splits a byte stream into
//! frames without I/O; a frame over the configured limit, an unknown kind or
//! non-zero flags is an error after which the connection cannot be trusted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;
/// Bytes of the header after the length prefix.
pub const HEADER_BYTES: usize = 11;
/// Default largest frame (header + body): a 16 MiB batch plus room for the
/// request around it.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024 + 64 * 1024;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client to broker.
    Request,
    /// Broker to client, answering the request with the same correlation id.
    Response,
    /// Broker to client, unasked: data for a subscription.
    Push,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Request => 0,
            FrameKind::Response => 1,
            FrameKind::Push => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(FrameKind::Request),
            1 => Some(FrameKind::Response),
            2 => Some(FrameKind::Push),
            _ => None,
        }
    }
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request, response or push.
    pub kind: FrameKind,
    /// The API (see `api::ApiKey`), as a raw number so that an unknown one
    /// can still be answered.
    pub api_key: u16,
    /// The API version.
    pub api_version: u16,
    /// Correlation id (or subscription id for pushes).
    pub correlation_id: u32,
}

/// One decoded frame; the body is a slice of the read buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// The body bytes.
    pub body: Bytes,
}

/// Why the byte stream is not a valid sequence of frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the limit.
    #[error("frame of {length} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared length.
        length: usize,
        /// The limit.
        limit: usize,
    },
    /// The length prefix is smaller than a header.
    #[error("frame length {0} is shorter than a header")]
    TooShort(usize),
    /// The kind byte is not 0, 1 or 2.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved flag bits are set.
    #[error("unsupported frame flags {0:#06x}")]
    UnsupportedFlags(u16),
}

/// Splits a byte stream into frames, enforcing the size limit before the
/// frame's bytes arrive (so a huge length costs no memory).
#[derive(Debug)]
pub struct FrameDecoder {
    frame_bytes_max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames over `frame_bytes_max` (header + body).
    pub fn new(frame_bytes_max: usize) -> Self {
        FrameDecoder { frame_bytes_max }
    }

    /// Bytes the next frame needs in all (including its length prefix), once
    /// its length is known; `None` before four bytes are buffered.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] or [`FrameError::TooShort`] from the prefix alone.
    pub fn frame_bytes(&self, buffer: &[u8]) -> Result<Option<usize>, FrameError> {
        if buffer.len() < LENGTH_BYTES {
            return Ok(None);
        }
        let length = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
        if length > self.frame_bytes_max {
            return Err(FrameError::TooLarge {
                length,
                limit: self.frame_bytes_max,
            });
        }
        if length < HEADER_BYTES {
            return Err(FrameError::TooShort(length));
        }
        Ok(Some(LENGTH_BYTES + length))
    }

    /// Takes one whole frame off the front of `buffer`, or returns `None`
    /// (leaving `buffer` alone) if it is not all there yet.
    ///
    /// # Errors
    /// A [`FrameError`]; the stream cannot be resynchronised after one.
    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(total) = self.frame_bytes(buffer)? else {
            return Ok(None);
        };
        if buffer.len() < total {
            buffer.reserve(total - buffer.len());
            return Ok(None);
        }
        let mut frame = buffer.split_to(total).freeze();
        frame.advance(LENGTH_BYTES);
        let kind_code = frame.get_u8();
        let kind = FrameKind::from_code(kind_code).ok_or(FrameError::UnknownKind(kind_code))?;
        let api_key = frame.get_u16();
        let api_version = frame.get_u16();
        let correlation_id = frame.get_u32();
        let flags = frame.get_u16();
        if flags != 0 {
            return Err(FrameError::UnsupportedFlags(flags));
        }
        Ok(Some(Frame {
            header: FrameHeader {
                kind,
                api_key,
                api_version,
                correlation_id,
            },
            body: frame,
        }))
    }
}

/// Writes a frame's length prefix and header in front of a body of
/// `body_bytes` bytes (the body follows, possibly in several chunks).
///
/// # Panics
/// If the frame would exceed `u32::MAX` bytes.
pub fn put_header(out: &mut BytesMut, header: &FrameHeader, body_bytes: usize) {
    let length = u32::try_from(HEADER_BYTES + body_bytes).expect("frame over 4 GiB");
    out.reserve(LENGTH_BYTES + HEADER_BYTES);
    out.put_u32(length);
    out.put_u8(header.kind.code());
    out.put_u16(header.api_key);
    out.put_u16(header.api_version);
    out.put_u32(header.correlation_id);
    out.put_u16(0);
}

/// Encodes a whole frame with a contiguous body.
pub fn encode(header: &FrameHeader, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(LENGTH_BYTES + HEADER_BYTES + body.len());
    put_header(&mut out, header, body.len());
    out.put_slice(body);
    out
}
