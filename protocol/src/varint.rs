//! Zig-zag varints as Kafka's RecordBatch v2 encodes them (protobuf style:
//! seven bits per byte, least significant group first, high bit = more).

use crate::BatchError;

/// Longest encoding of a 32-bit varint.
pub const VARINT_BYTES_MAX: usize = 5;
/// Longest encoding of a 64-bit varlong.
pub const VARLONG_BYTES_MAX: usize = 10;

/// Appends `value` zig-zag encoded as a varint (Kafka's `varint`).
pub fn put_varint(out: &mut Vec<u8>, value: i32) {
    put_unsigned(out, ((value << 1) ^ (value >> 31)) as u32 as u64);
}

/// Appends `value` zig-zag encoded as a varlong (Kafka's `varlong`).
pub fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Number of bytes `put_varint(value)` writes.
pub fn varint_len(value: i32) -> usize {
    unsigned_len(((value << 1) ^ (value >> 31)) as u32 as u64)
}

/// Number of bytes `put_varlong(value)` writes.
pub fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a zig-zag varint from the front of `input`, returning it and the
/// bytes it used.
///
/// # Errors
/// [`BatchError::Varint`] when `input` ends mid-varint or the encoding is
/// longer than five bytes.
pub fn get_varint(input: &[u8]) -> Result<(i32, usize), BatchError> {
    let (raw, used) = get_unsigned(input, VARINT_BYTES_MAX)?;
    if raw > u64::from(u32::MAX) {
        return Err(BatchError::Varint);
    }
    let raw = raw as u32;
    Ok((((raw >> 1) as i32) ^ -((raw & 1) as i32), used))
}

/// Reads a zig-zag varlong from the front of `input`.
///
/// # Errors
/// [`BatchError::Varint`] when `input` ends mid-varint or the encoding is
/// longer than ten bytes.
pub fn get_varlong(input: &[u8]) -> Result<(i64, usize), BatchError> {
    let (raw, used) = get_unsigned(input, VARLONG_BYTES_MAX)?;
    Ok((((raw >> 1) as i64) ^ -((raw & 1) as i64), used))
}

fn get_unsigned(input: &[u8], bytes_max: usize) -> Result<(u64, usize), BatchError> {
    let mut value: u64 = 0;
    for (index, byte) in input.iter().take(bytes_max).enumerate() {
        let shift = 7 * index as u32;
        let group = u64::from(byte & 0x7f);
        if shift == 63 && group > 1 {
            return Err(BatchError::Varint);
        }
        value |= group << shift;
        if byte & 0x80 == 0 {
            return Ok((value, index + 1));
        }
    }
    Err(BatchError::Varint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Known encodings from Kafka's ByteUtilsTest agree with ours.
    #[test]
    fn matches_kafka_examples() {
        let mut out = Vec::new();
        put_varint(&mut out, 0);
        put_varint(&mut out, -1);
        put_varint(&mut out, 1);
        put_varint(&mut out, 63);
        put_varint(&mut out, -64);
        put_varint(&mut out, 64);
        assert_eq!(out, [0x00, 0x01, 0x02, 0x7e, 0x7f, 0x80, 0x01]);
        let mut out = Vec::new();
        put_varint(&mut out, i32::MIN);
        assert_eq!(out, [0xff, 0xff, 0xff, 0xff, 0x0f]);
    }

    proptest! {
        /// Every i32 and i64 round-trips, and the length helpers agree with the encoder.
        #[test]
        fn round_trips(a in any::<i32>(), b in any::<i64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, a);
            prop_assert_eq!(out.len(), varint_len(a));
            prop_assert_eq!(get_varint(&out).ok(), Some((a, out.len())));
            let mut out = Vec::new();
            put_varlong(&mut out, b);
            prop_assert_eq!(out.len(), varlong_len(b));
            prop_assert_eq!(get_varlong(&out).ok(), Some((b, out.len())));
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            let _ = get_varint(&bytes);
            let _ = get_varlong(&bytes);
        }
    }
}
