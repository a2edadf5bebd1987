//! Tests of the RecordBatch v2 codec: layout, round trips and refusal of bad input.

use proptest::prelude::*;
use weir_protocol::batch::{self, BATCH_HEADER_BYTES};
use weir_protocol::{Batch, BatchBuilder, BatchError, Batches, Compression, ProducerStamp};

type OwnedRecord = (
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

fn build(base_ts: i64, records: &[OwnedRecord]) -> Vec<u8> {
    let mut builder = BatchBuilder::new(base_ts);
    for (ts, key, value, headers) in records {
        let headers: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .collect();
        builder.push(*ts, key.as_deref(), value.as_deref(), &headers);
    }
    builder.finish()
}

/// The checksum is CRC-32C (Castagnoli), the one Kafka's v2 format uses.
#[test]
fn checksum_is_castagnoli() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}

/// A one-record batch has exactly the bytes the Kafka v2 specification gives.
#[test]
fn single_record_layout_matches_kafka_spec() {
    let mut builder = BatchBuilder::new(1_000).producer(ProducerStamp {
        producer_id: 7,
        producer_epoch: 1,
        base_sequence: 3,
    });
    builder.push(1_005, Some(b"k"), Some(b"vv"), &[("h", Some(b"x"))]);
    let bytes = builder.finish();
    // Record body: attributes 0, ts delta 5 -> zigzag 10, offset delta 0,
    // key len 1 -> 2, 'k', value len 2 -> 4, "vv", 1 header -> 2,
    // header key len 1 -> 2, 'h', value len 1 -> 2, 'x'.
    let body = [0u8, 10, 0, 2, b'k', 4, b'v', b'v', 2, 2, b'h', 2, b'x'];
    let mut expected_records = vec![(body.len() as u8) * 2];
    expected_records.extend_from_slice(&body);
    assert_eq!(&bytes[BATCH_HEADER_BYTES..], &expected_records[..]);
    assert_eq!(&bytes[0..8], &[0u8; 8], "base offset left for the broker");
    let length = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    assert_eq!(length, bytes.len() - 12);
    assert_eq!(&bytes[12..16], &(-1i32).to_be_bytes(), "leader epoch unset");
    assert_eq!(bytes[16], 2, "magic");
    let crc = u32::from_be_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]);
    assert_eq!(crc, crc32c::crc32c(&bytes[21..]));
    assert_eq!(&bytes[21..23], &[0, 0], "attributes");
    assert_eq!(&bytes[23..27], &0i32.to_be_bytes(), "last offset delta");
    assert_eq!(&bytes[27..35], &1_000i64.to_be_bytes(), "base timestamp");
    assert_eq!(&bytes[35..43], &1_005i64.to_be_bytes(), "max timestamp");
    assert_eq!(&bytes[43..51], &7i64.to_be_bytes(), "producer id");
    assert_eq!(&bytes[51..53], &1i16.to_be_bytes(), "producer epoch");
    assert_eq!(&bytes[53..57], &3i32.to_be_bytes(), "base sequence");
    assert_eq!(&bytes[57..61], &1i32.to_be_bytes(), "records count");

    let batch = Batch::parse_verified(&bytes).expect("valid batch");
    assert_eq!(batch.producer_id(), 7);
    assert_eq!(batch.base_sequence(), 3);
    let record = batch
        .records()
        .expect("uncompressed")
        .next()
        .expect("one")
        .expect("ok");
    assert_eq!(record.key, Some(&b"k"[..]));
    assert_eq!(record.value, Some(&b"vv"[..]));
    assert_eq!(record.timestamp_ms, 1_005);
    let header = record.headers().next().expect("one header").expect("ok");
    assert_eq!(header.key, "h");
    assert_eq!(header.value, Some(&b"x"[..]));
}

/// Patching the base offset and leader epoch keeps the CRC valid and shifts
/// every record's offset.
#[test]
fn patching_offsets_keeps_crc() {
    let mut bytes = build(
        0,
        &[
            (0, None, Some(b"a".to_vec()), vec![]),
            (1, None, None, vec![]),
        ],
    );
    batch::patch_base_offset(&mut bytes, 1_000_000);
    batch::patch_leader_epoch(&mut bytes, 9);
    let batch = Batch::parse_verified(&bytes).expect("still valid");
    assert_eq!(batch.base_offset(), 1_000_000);
    assert_eq!(batch.last_offset(), 1_000_001);
    assert_eq!(batch.partition_leader_epoch(), 9);
    let offsets: Vec<u64> = batch
        .records()
        .expect("plain")
        .map(|r| r.expect("ok").offset)
        .collect();
    assert_eq!(offsets, [1_000_000, 1_000_001]);
}

/// Each kind of damage gets its own typed error.
#[test]
fn bad_batches_are_refused_with_the_reason() {
    let good = build(0, &[(0, Some(b"k".to_vec()), Some(b"v".to_vec()), vec![])]);

    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x40;
    assert!(matches!(
        Batch::parse_verified(&bad_crc),
        Err(BatchError::BadCrc { .. })
    ));
    assert!(
        Batch::parse(&bad_crc).is_ok(),
        "framing alone does not read the CRC"
    );

    let mut bad_magic = good.clone();
    bad_magic[16] = 1;
    assert_eq!(
        Batch::parse(&bad_magic).err(),
        Some(BatchError::BadMagic(1))
    );

    assert!(matches!(
        Batch::parse(&good[..good.len() - 1]),
        Err(BatchError::Truncated { .. })
    ));
    assert!(matches!(
        Batch::parse(&good[..20]),
        Err(BatchError::Truncated { .. })
    ));

    let mut bad_length = good.clone();
    bad_length[8..12].copy_from_slice(&(-5i32).to_be_bytes());
    assert_eq!(
        Batch::parse(&bad_length).err(),
        Some(BatchError::BadLength(-5))
    );

    let mut zero_records = good.clone();
    zero_records[57..61].copy_from_slice(&0i32.to_be_bytes());
    assert_eq!(
        Batch::parse(&zero_records).err(),
        Some(BatchError::NoRecords(0))
    );

    let mut bad_delta = good.clone();
    bad_delta[23..27].copy_from_slice(&5i32.to_be_bytes());
    assert!(matches!(
        Batch::parse(&bad_delta),
        Err(BatchError::OffsetDeltaMismatch { .. })
    ));

    let mut bad_codec = good;
    bad_codec[22] |= 0x07;
    assert_eq!(
        Batch::parse(&bad_codec).err(),
        Some(BatchError::UnknownCompression(7))
    );
}

/// A batch marked compressed is stored as is but its records are not parsed here.
#[test]
fn compressed_records_are_not_iterated() {
    let mut bytes = build(0, &[(0, None, Some(b"v".to_vec()), vec![])]);
    bytes[22] |= Compression::Zstd.id() as u8;
    let crc = crc32c::crc32c(&bytes[21..]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    let batch = Batch::parse_verified(&bytes).expect("valid framing");
    assert_eq!(batch.compression(), Compression::Zstd);
    assert_eq!(
        batch.records().err(),
        Some(BatchError::Compressed(Compression::Zstd))
    );
}

fn arb_record() -> impl Strategy<Value = OwnedRecord> {
    let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40));
    (
        -1_000i64..1_000_000,
        bytes(),
        bytes(),
        proptest::collection::vec(("[a-z]{0,8}", bytes()), 0..3),
    )
}

proptest! {
    /// Any records survive build -> parse -> iterate unchanged, and the
    /// builder's size prediction is exact.
    #[test]
    fn round_trip(base_ts in -1_000i64..1_000_000, records in proptest::collection::vec(arb_record(), 1..20)) {
        let bytes = build(base_ts, &records);
        let batch = Batch::parse_verified(&bytes).expect("valid");
        prop_assert_eq!(batch.len(), bytes.len());
        prop_assert_eq!(batch.records_count() as usize, records.len());
        prop_assert_eq!(batch.max_timestamp(), records.iter().map(|r| r.0).max().unwrap_or(base_ts).max(base_ts));
        for (index, (parsed, original)) in batch.records().expect("plain").zip(&records).enumerate() {
            let parsed = parsed.expect("record parses");
            prop_assert_eq!(parsed.offset, index as u64);
            prop_assert_eq!(parsed.timestamp_ms, original.0);
            prop_assert_eq!(parsed.key, original.1.as_deref());
            prop_assert_eq!(parsed.value, original.2.as_deref());
            let headers: Vec<(String, Option<Vec<u8>>)> = parsed
                .headers()
                .map(|h| h.map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))))
                .collect::<Result<_, _>>()
                .expect("headers parse");
            prop_assert_eq!(&headers, &original.3);
        }
        let mut sizer = BatchBuilder::new(base_ts);
        for (ts, key, value, _) in &records {
            let predicted = sizer.record_bytes(*ts, key.as_deref(), value.as_deref(), &[]);
            let before = sizer.len_bytes();
            sizer.push(*ts, key.as_deref(), value.as_deref(), &[]);
            prop_assert_eq!(sizer.len_bytes() - before, predicted);
            // The builder-free bound never undercounts.
            prop_assert!(BatchBuilder::record_bytes_max(key.as_deref(), value.as_deref(), &[]) >= predicted);
        }
    }

    /// Concatenated batches iterate back one by one; any byte flipped in the
    /// stream is caught by the CRC or the framing, never returned as data.
    #[test]
    fn stream_of_batches_detects_any_flip(sizes in proptest::collection::vec(1usize..5, 1..6), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut stream = Vec::new();
        let mut next = 0u64;
        for size in &sizes {
            let records: Vec<OwnedRecord> = (0..*size).map(|i| (i as i64, None, Some(vec![i as u8; 10]), vec![])).collect();
            let mut bytes = build(0, &records);
            batch::patch_base_offset(&mut bytes, next);
            next += *size as u64;
            stream.extend_from_slice(&bytes);
        }
        let parsed: Vec<u64> = Batches::new(&stream, true).map(|b| b.expect("valid").base_offset()).collect();
        prop_assert_eq!(parsed.len(), sizes.len());
        let at = flip.index(stream.len());
        // Bytes 0..8 and 12..16 of each batch (offset, epoch) are outside the
        // CRC by design; flip only covered bytes.
        let mut position = 0;
        let mut covered = true;
        for batch in Batches::new(&stream, true) {
            let len = batch.expect("valid").len();
            if at >= position && at < position + len {
                let within = at - position;
                covered = !(within < 8 || (12..16).contains(&within));
            }
            position += len;
        }
        prop_assume!(covered);
        stream[at] ^= 1 << bit;
        let results: Vec<_> = Batches::new(&stream, true).collect();
        prop_assert!(results.iter().any(Result::is_err), "a flipped byte went unnoticed");
    }
}
