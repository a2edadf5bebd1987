//! Primitive encodings of the wire protocol: big-endian integers,
//! length-prefixed strings and byte strings, counted arrays.
//!
//! Decoding never trusts a length: every length is checked against the bytes
//! that remain and against a named limit before anything is allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest string (topic names, client names, config keys and values).
pub const STRING_BYTES_MAX: usize = 32 * 1024;

/// Why a frame body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The body ended inside a field.
    #[error("body truncated inside {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A string is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// A length or count exceeds its limit or the bytes that remain.
    #[error("{field} length {length} exceeds its limit of {limit}")]
    TooLong {
        /// The field being read.
        field: &'static str,
        /// The length given.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// Bytes remain after the last field.
    #[error("{extra} unexpected bytes after the body")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A field holds a value outside its domain.
    #[error("{field} has invalid value {value}")]
    InvalidValue {
        /// The field being read.
        field: &'static str,
        /// The value found.
        value: i64,
    },
}

/// Reads fields from a frame body. Byte strings are returned as `Bytes`
/// slices of the body: no copy.
#[derive(Debug)]
pub struct Reader {
    body: Bytes,
}

impl Reader {
    /// Reads from `body`.
    pub fn new(body: Bytes) -> Self {
        Reader { body }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.body.remaining()
    }

    /// Up to the next `bytes` bytes, without consuming them.
    pub fn peek(&self, bytes: usize) -> Bytes {
        self.body.slice(..bytes.min(self.body.len()))
    }

    fn need(&self, bytes: usize, field: &'static str) -> Result<(), WireError> {
        if self.body.remaining() < bytes {
            Err(WireError::Truncated { field })
        } else {
            Ok(())
        }
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.need(1, field)?;
        Ok(self.body.get_u8())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn i8(&mut self, field: &'static str) -> Result<i8, WireError> {
        self.need(1, field)?;
        Ok(self.body.get_i8())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn i16(&mut self, field: &'static str) -> Result<i16, WireError> {
        self.need(2, field)?;
        Ok(self.body.get_i16())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.need(2, field)?;
        Ok(self.body.get_u16())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.need(4, field)?;
        Ok(self.body.get_u32())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn i32(&mut self, field: &'static str) -> Result<i32, WireError> {
        self.need(4, field)?;
        Ok(self.body.get_i32())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.need(8, field)?;
        Ok(self.body.get_u64())
    }

    /// # Errors
    /// [`WireError::Truncated`].
    pub fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        self.need(8, field)?;
        Ok(self.body.get_i64())
    }

    /// A `u16`-length-prefixed UTF-8 string.
    ///
    /// # Errors
    /// Truncation, a length over [`STRING_BYTES_MAX`], or invalid UTF-8.
    pub fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let length = usize::from(self.u16(field)?);
        if length > STRING_BYTES_MAX {
            return Err(WireError::TooLong {
                field,
                length: length as u64,
                limit: STRING_BYTES_MAX as u64,
            });
        }
        self.need(length, field)?;
        let bytes = self.body.split_to(length);
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8 { field })
    }

    /// A string that may be null (length `0xFFFF`).
    ///
    /// # Errors
    /// As [`Reader::string`].
    pub fn nullable_string(&mut self, field: &'static str) -> Result<Option<String>, WireError> {
        self.need(2, field)?;
        if self.body.chunk()[..2] == [0xff, 0xff] {
            self.body.advance(2);
            return Ok(None);
        }
        self.string(field).map(Some)
    }

    /// A `u32`-length-prefixed byte string, at most `limit` bytes, returned
    /// without copying.
    ///
    /// # Errors
    /// Truncation or a length over `limit`.
    pub fn bytes(&mut self, field: &'static str, limit: usize) -> Result<Bytes, WireError> {
        let length = self.u32(field)? as usize;
        if length > limit {
            return Err(WireError::TooLong {
                field,
                length: length as u64,
                limit: limit as u64,
            });
        }
        self.need(length, field)?;
        Ok(self.body.split_to(length))
    }

    /// A `u32` element count. Every element takes at least `element_bytes_min`
    /// bytes, so a count the remaining bytes cannot hold is refused before
    /// anything is allocated.
    ///
    /// # Errors
    /// Truncation or an impossible count.
    pub fn count(
        &mut self,
        field: &'static str,
        element_bytes_min: usize,
    ) -> Result<usize, WireError> {
        let count = self.u32(field)? as usize;
        let limit = self.remaining() / element_bytes_min.max(1);
        if count > limit {
            return Err(WireError::TooLong {
                field,
                length: count as u64,
                limit: limit as u64,
            });
        }
        Ok(count)
    }

    /// Checks that the whole body was read.
    ///
    /// # Errors
    /// [`WireError::TrailingBytes`].
    pub fn finish(self) -> Result<(), WireError> {
        match self.body.remaining() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { extra }),
        }
    }
}

/// Writes fields into a frame body. Record bytes are not copied: they are
/// kept as separate parts, so a body is a list of `Bytes` for a vectored
/// write.
#[derive(Debug, Default)]
pub struct Writer {
    buf: BytesMut,
    parts: Vec<Bytes>,
    parts_bytes: usize,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer::default()
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.parts_bytes + self.buf.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as parts, in order.
    pub fn into_parts(mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.parts.push(self.buf.freeze());
        }
        self.parts
    }

    /// The body copied into one buffer.
    pub fn into_bytes(self) -> Bytes {
        let parts = self.into_parts();
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
        for part in parts {
            out.put_slice(&part);
        }
        out.freeze()
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, value: u8) {
        self.buf.put_u8(value);
    }

    /// Appends an `i8`.
    pub fn i8(&mut self, value: i8) {
        self.buf.put_i8(value);
    }

    /// Appends an `i16`.
    pub fn i16(&mut self, value: i16) {
        self.buf.put_i16(value);
    }

    /// Appends a `u16`.
    pub fn u16(&mut self, value: u16) {
        self.buf.put_u16(value);
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, value: u32) {
        self.buf.put_u32(value);
    }

    /// Appends an `i32`.
    pub fn i32(&mut self, value: i32) {
        self.buf.put_i32(value);
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, value: u64) {
        self.buf.put_u64(value);
    }

    /// Appends an `i64`.
    pub fn i64(&mut self, value: i64) {
        self.buf.put_i64(value);
    }

    /// A string, truncated to [`STRING_BYTES_MAX`] bytes at a character
    /// boundary (callers validate names long before they are encoded).
    pub fn string(&mut self, value: &str) {
        let mut end = value.len().min(STRING_BYTES_MAX);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.buf.put_u16(end as u16);
        self.buf.put_slice(&value.as_bytes()[..end]);
    }

    /// A nullable string (`None` as length `0xFFFF`).
    pub fn nullable_string(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.string(value),
            None => self.buf.put_u16(0xffff),
        }
    }

    /// A byte string made of `chunks`, kept as parts without copying.
    ///
    /// # Panics
    /// If the chunks add up to more than `u32::MAX` bytes (frames are far smaller).
    pub fn chunked_bytes(&mut self, chunks: &[Bytes]) {
        let total: usize = chunks.iter().map(Bytes::len).sum();
        let length = u32::try_from(total).expect("byte string over 4 GiB");
        self.buf.put_u32(length);
        if total == 0 {
            return;
        }
        if !self.buf.is_empty() {
            let head = self.buf.split().freeze();
            self.parts_bytes += head.len();
            self.parts.push(head);
        }
        for chunk in chunks.iter().filter(|chunk| !chunk.is_empty()) {
            self.parts_bytes += chunk.len();
            self.parts.push(chunk.clone());
        }
    }

    /// A count of elements.
    ///
    /// # Panics
    /// If `count` exceeds `u32::MAX`.
    pub fn count(&mut self, count: usize) {
        self.buf
            .put_u32(u32::try_from(count).expect("more than 2^32 elements"));
    }
}
