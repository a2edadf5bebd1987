//! Any bytes handed to the batch parser yield a batch or a typed error, never
//! a panic; whatever parses iterates its records and headers safely.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_protocol::{Batch, Batches};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = Batch::parse(data) {
        assert!(batch.len() <= data.len());
        let _ = batch.verify_crc();
        if let Ok(records) = batch.records() {
            for record in records {
                let Ok(record) = record else { break };
                for header in record.headers() {
                    if header.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let mut consumed = 0usize;
    for batch in Batches::new(data, true) {
        match batch {
            Ok(batch) => {
                batch.verify_crc().expect("the iterator only yields verified batches");
                consumed += batch.len();
            }
            Err(_) => break,
        }
    }
    assert!(consumed <= data.len());
});
