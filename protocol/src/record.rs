//! Records inside an uncompressed batch, read without copying.
//!
//! ```text
//! length          varint  bytes after this field
//! attributes      int8    unused, 0
//! timestamp_delta varlong from the batch's base timestamp
//! offset_delta    varint  from the batch's base offset
//! key_length      varint  -1 for a null key
//! key             bytes
//! value_length    varint  -1 for a null value
//! value           bytes
//! headers_count   varint
//! headers         (key_length varint, key utf-8, value_length varint, value) × count
//! ```

use crate::BatchError;
use crate::varint::{get_varint, get_varlong};

/// One record, borrowed from its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Absolute offset (batch base offset + offset delta).
    pub offset: u64,
    /// Absolute timestamp in milliseconds (batch base timestamp + delta).
    pub timestamp_ms: i64,
    /// The key, `None` when null.
    pub key: Option<&'a [u8]>,
    /// The value, `None` when null (a tombstone).
    pub value: Option<&'a [u8]>,
    headers_count: i32,
    headers: &'a [u8],
}

impl<'a> Record<'a> {
    /// The record's headers in order.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            rest: self.headers,
            remaining: self.headers_count,
        }
    }
}

/// One header: a UTF-8 key (checked) and an optional value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Header name.
    pub key: &'a str,
    /// Header value, `None` when null.
    pub value: Option<&'a [u8]>,
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<i32, BatchError> {
        let (value, used) = get_varint(self.rest)?;
        self.rest = &self.rest[used..];
        Ok(value)
    }

    fn varlong(&mut self) -> Result<i64, BatchError> {
        let (value, used) = get_varlong(self.rest)?;
        self.rest = &self.rest[used..];
        Ok(value)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], BatchError> {
        if self.rest.len() < len {
            return Err(BatchError::BadRecord("field runs past the record"));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, BatchError> {
        match self.varint()? {
            -1 => Ok(None),
            len if len >= 0 => self.take(len as usize).map(Some),
            _ => Err(BatchError::BadRecord("negative length")),
        }
    }
}

/// Iterator over the records of one uncompressed batch.
#[derive(Debug)]
pub struct Records<'a> {
    rest: &'a [u8],
    base_offset: u64,
    base_timestamp_ms: i64,
    remaining: i32,
}

impl<'a> Records<'a> {
    pub(crate) fn new(
        rest: &'a [u8],
        base_offset: u64,
        base_timestamp_ms: i64,
        count: i32,
    ) -> Self {
        Records {
            rest,
            base_offset,
            base_timestamp_ms,
            remaining: count,
        }
    }

    /// Bytes not yet parsed. Once every record has been taken, anything
    /// left is not part of any record: a well-formed batch has none.
    pub fn rest_bytes(&self) -> usize {
        self.rest.len()
    }

    fn parse_one(&mut self) -> Result<Record<'a>, BatchError> {
        let mut outer = Cursor { rest: self.rest };
        let length = outer.varint()?;
        let length =
            usize::try_from(length).map_err(|_| BatchError::BadRecord("negative length"))?;
        let body = outer.take(length)?;
        self.rest = outer.rest;
        let mut cursor = Cursor { rest: body };
        let _attributes = cursor.take(1)?;
        let timestamp_delta = cursor.varlong()?;
        let offset_delta = cursor.varint()?;
        if offset_delta < 0 {
            return Err(BatchError::BadRecord("negative offset delta"));
        }
        let key = cursor.nullable_bytes()?;
        let value = cursor.nullable_bytes()?;
        let headers_count = cursor.varint()?;
        if headers_count < 0 {
            return Err(BatchError::BadRecord("negative header count"));
        }
        let headers = cursor.rest;
        // Walk the headers once so that a record that parses is whole.
        for header in (Headers {
            rest: headers,
            remaining: headers_count,
        }) {
            header?;
        }
        Ok(Record {
            offset: self.base_offset + offset_delta as u64,
            timestamp_ms: self.base_timestamp_ms.wrapping_add(timestamp_delta),
            key,
            value,
            headers_count,
            headers,
        })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining <= 0 {
            return None;
        }
        self.remaining -= 1;
        let parsed = self.parse_one();
        if parsed.is_err() {
            self.remaining = 0;
        }
        Some(parsed)
    }
}

/// Iterator over a record's headers.
#[derive(Debug)]
pub struct Headers<'a> {
    rest: &'a [u8],
    remaining: i32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = Result<Header<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining <= 0 {
            return None;
        }
        self.remaining -= 1;
        let mut cursor = Cursor { rest: self.rest };
        let parsed = (|| {
            let key = cursor
                .nullable_bytes()?
                .ok_or(BatchError::BadRecord("null header key"))?;
            let key = std::str::from_utf8(key)
                .map_err(|_| BatchError::BadRecord("header key not utf-8"))?;
            let value = cursor.nullable_bytes()?;
            Ok(Header { key, value })
        })();
        self.rest = cursor.rest;
        if parsed.is_err() {
            self.remaining = 0;
        }
        Some(parsed)
    }
}
