//! The compression codecs of a RecordBatch's records section, as Kafka
//! clients write them: gzip (RFC 1952, possibly several members), snappy
//! (raw, as librdkafka writes it, or in the xerial framing of the Java
//! client and kafka-python), LZ4 (the standard frame format) and zstd
//! (a standard frame).
//!
//! Decompression is bounded: `bytes_max` caps what a section may expand
//! to, so a small hostile batch cannot make a reader allocate gigabytes.
//! Weir writes snappy in the xerial framing, which every Kafka client
//! reads.

use std::io::{Read, Write};

use crate::batch::Compression;

/// Most bytes the compressed records of one produce request (broker) or
/// one batch (client) may expand to: 64 MiB, four times the largest batch.
/// The broker refuses what expands further, so a reader never needs more.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 << 20;

/// Largest zstd window accepted (2^24 = 16 MiB): a batch is at most that
/// large, so a larger window is not a real producer's.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// The zstd level Weir compresses with (zstd's default).
const ZSTD_LEVEL: i32 = 3;
/// The xerial snappy stream header: magic, then version and compatible
/// version (both 1) as big-endian i32s.
const XERIAL_MAGIC: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
const XERIAL_HEADER_BYTES: usize = 16;
/// Uncompressed bytes per xerial block (the Java client's 32 KiB).
const XERIAL_BLOCK_BYTES: usize = 32 * 1024;
/// Most a snappy block can expand: 64 bytes from a 3-byte copy op is the
/// largest ratio (about 21); anything claiming more is not snappy.
const SNAPPY_EXPANSION_MAX: usize = 32;

/// A records section that cannot be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The compressed bytes are not valid for the codec.
    #[error("corrupt {codec:?} data: {reason}")]
    Corrupt {
        /// The codec.
        codec: Compression,
        /// What the decoder reported.
        reason: String,
    },
    /// The section expands past the reader's limit.
    #[error("{codec:?} data expands past {bytes_max} bytes")]
    TooLarge {
        /// The codec.
        codec: Compression,
        /// The limit.
        bytes_max: usize,
    },
    /// Compressing failed (an encoder error; not expected in memory).
    #[error("{codec:?} compression failed: {reason}")]
    Compress {
        /// The codec.
        codec: Compression,
        /// What the encoder reported.
        reason: String,
    },
}

/// `records` compressed with `codec` (a copy for [`Compression::None`]).
///
/// # Errors
/// [`CodecError::Compress`] if an encoder fails.
pub fn compress(codec: Compression, records: &[u8]) -> Result<Vec<u8>, CodecError> {
    let failed = |error: std::io::Error| CodecError::Compress {
        codec,
        reason: error.to_string(),
    };
    match codec {
        Compression::None => Ok(records.to_vec()),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(records.len() / 2),
                flate2::Compression::default(),
            );
            encoder.write_all(records).map_err(failed)?;
            encoder.finish().map_err(failed)
        }
        Compression::Snappy => snappy_xerial(records).map_err(|error| CodecError::Compress {
            codec,
            reason: error.to_string(),
        }),
        Compression::Lz4 => {
            let mut encoder =
                lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(records.len() / 2));
            encoder.write_all(records).map_err(failed)?;
            encoder.finish().map_err(|error| CodecError::Compress {
                codec,
                reason: error.to_string(),
            })
        }
        Compression::Zstd => zstd::bulk::compress(records, ZSTD_LEVEL).map_err(failed),
    }
}

/// `bytes` decompressed with `codec`, at most `bytes_max` bytes of it.
///
/// # Errors
/// [`CodecError::Corrupt`] for data the codec cannot read,
/// [`CodecError::TooLarge`] past `bytes_max`.
pub fn decompress(
    codec: Compression,
    bytes: &[u8],
    bytes_max: usize,
) -> Result<Vec<u8>, CodecError> {
    let corrupt = |error: std::io::Error| CodecError::Corrupt {
        codec,
        reason: error.to_string(),
    };
    // One byte more than allowed tells "exactly the limit" from "past it".
    let limit = (bytes_max as u64).saturating_add(1);
    let mut out = Vec::new();
    match codec {
        Compression::None => {
            out.extend_from_slice(&bytes[..bytes.len().min(bytes_max.saturating_add(1))]);
        }
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(bytes)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Compression::Snappy => return snappy_decompress(bytes, bytes_max),
        Compression::Lz4 => {
            lz4_flex::frame::FrameDecoder::new(bytes)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(bytes).map_err(corrupt)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(corrupt)?;
            decoder.take(limit).read_to_end(&mut out).map_err(corrupt)?;
        }
    }
    if out.len() > bytes_max {
        return Err(CodecError::TooLarge { codec, bytes_max });
    }
    Ok(out)
}

/// Snappy in the xerial framing: the header, then blocks of (big-endian
/// i32 length, raw snappy block) of at most [`XERIAL_BLOCK_BYTES`] input each.
fn snappy_xerial(records: &[u8]) -> Result<Vec<u8>, snap::Error> {
    let mut out = Vec::with_capacity(XERIAL_HEADER_BYTES + records.len() / 2);
    out.extend_from_slice(&XERIAL_MAGIC);
    out.extend_from_slice(&1i32.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    let mut encoder = snap::raw::Encoder::new();
    for chunk in records.chunks(XERIAL_BLOCK_BYTES) {
        let block = encoder.compress_vec(chunk)?;
        out.extend_from_slice(&(block.len() as u32).to_be_bytes());
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// Raw snappy, or the xerial framing when its magic leads.
fn snappy_decompress(bytes: &[u8], bytes_max: usize) -> Result<Vec<u8>, CodecError> {
    let codec = Compression::Snappy;
    let corrupt = |reason: String| CodecError::Corrupt { codec, reason };
    let mut decoder = snap::raw::Decoder::new();
    // A block's claimed length is checked against what is left of the
    // limit before anything is allocated for it.
    let mut block = |input: &[u8], out: &mut Vec<u8>| -> Result<(), CodecError> {
        let length =
            snap::raw::decompress_len(input).map_err(|error| corrupt(error.to_string()))?;
        if out.len().saturating_add(length) > bytes_max {
            return Err(CodecError::TooLarge { codec, bytes_max });
        }
        // No snappy op expands more than ~22 times (a 3-byte copy of 64
        // bytes): a larger claim is a lie, refused before allocating it.
        if length > input.len().saturating_mul(SNAPPY_EXPANSION_MAX) {
            return Err(corrupt(format!(
                "a {}-byte block claims {length} bytes",
                input.len()
            )));
        }
        let start = out.len();
        out.resize(start + length, 0);
        decoder
            .decompress(input, &mut out[start..])
            .map_err(|error| corrupt(error.to_string()))?;
        Ok(())
    };
    let mut out = Vec::new();
    if !bytes.starts_with(&XERIAL_MAGIC) {
        block(bytes, &mut out)?;
        return Ok(out);
    }
    let mut rest = bytes
        .get(XERIAL_HEADER_BYTES..)
        .ok_or_else(|| corrupt("truncated xerial header".to_string()))?;
    while !rest.is_empty() {
        let (length, after) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated xerial block length".to_string()))?;
        let length = u32::from_be_bytes(*length) as usize;
        let input = after
            .get(..length)
            .ok_or_else(|| corrupt("truncated xerial block".to_string()))?;
        block(input, &mut out)?;
        rest = &after[length..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    fn sample(bytes: usize) -> Vec<u8> {
        (0..bytes)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect()
    }

    /// Every codec gives back what it was given, across xerial's block size.
    #[test]
    fn every_codec_round_trips() {
        for codec in ALL {
            for size in [0, 1, 1000, XERIAL_BLOCK_BYTES, 3 * XERIAL_BLOCK_BYTES + 17] {
                let records = sample(size);
                let compressed = compress(codec, &records).expect("compress");
                let back = decompress(codec, &compressed, 1 << 20).expect("decompress");
                assert_eq!(back, records, "{codec:?}, {size} bytes");
            }
        }
    }

    /// Expanding past the limit is refused, for every codec.
    #[test]
    fn expansion_past_the_limit_is_refused() {
        let records = vec![0u8; 200_000];
        for codec in ALL {
            let compressed = compress(codec, &records).expect("compress");
            assert_eq!(
                decompress(codec, &compressed, 100_000),
                Err(CodecError::TooLarge {
                    codec,
                    bytes_max: 100_000
                }),
                "{codec:?}"
            );
            assert!(decompress(codec, &compressed, 200_000).is_ok(), "{codec:?}");
        }
    }

    /// Garbage is reported as corrupt, not decoded and not a panic.
    #[test]
    fn garbage_is_corrupt() {
        let garbage = b"stored as sent, but not compressed".to_vec();
        for codec in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            assert!(
                matches!(
                    decompress(codec, &garbage, 1 << 20),
                    Err(CodecError::Corrupt { .. })
                ),
                "{codec:?}"
            );
        }
        let mut xerial = snappy_xerial(&sample(100)).expect("compress");
        xerial.truncate(xerial.len() - 3);
        assert!(matches!(
            decompress(Compression::Snappy, &xerial, 1 << 20),
            Err(CodecError::Corrupt { .. })
        ));
    }

    /// Raw snappy (librdkafka's form) is read as well as the xerial framing.
    #[test]
    fn raw_snappy_is_read() {
        let records = sample(5000);
        let raw = snap::raw::Encoder::new()
            .compress_vec(&records)
            .expect("compress");
        assert_eq!(
            decompress(Compression::Snappy, &raw, 1 << 20).expect("raw"),
            records
        );
    }

    /// A block whose header claims far more than snappy can expand to is
    /// refused before anything is allocated for it.
    #[test]
    fn a_lying_snappy_length_is_corrupt() {
        // Varint 60,000,000 followed by two bytes of "data".
        let mut lying = Vec::new();
        let mut length = 60_000_000u32;
        while length >= 0x80 {
            lying.push((length as u8) | 0x80);
            length >>= 7;
        }
        lying.push(length as u8);
        lying.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decompress(Compression::Snappy, &lying, 64 << 20),
            Err(CodecError::Corrupt { .. })
        ));
    }
}
