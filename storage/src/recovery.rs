//! Opening a log directory: trust what a clean shutdown or a sync vouches
//! for, scan everything else batch by batch, and cut at the first bad byte.
//!
//! - With the clean-shutdown marker, sealed segments are trusted if their
//!   indexes look sane (otherwise they are rebuilt by a scan), and only the
//!   tail of the active segment after its last index entry is scanned.
//! - Without it, every segment that may hold offsets at or after the
//!   recovery point is scanned from its start: length, magic, CRC-32C and
//!   offset continuity. The log ends at the first batch that fails; the rest
//!   of that segment is zeroed and later segments are deleted, and what was
//!   cut is logged. Indexes of scanned segments are rebuilt from the log.
//!
//! Architecture invariant: after `recover`, every published byte is a valid
//! batch with contiguous offsets, and nothing past the first bad byte is
//! reachable by a reader or by a later recovery.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::{self, CLEAN_SHUTDOWN_FILE};
use crate::config::LogConfig;
use crate::error::{Result, StorageError};
use crate::index;
use crate::segment::{FILE_NAME_DIGITS, ScanEnd, Segment};

/// What opening a log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The clean-shutdown marker was present.
    pub clean: bool,
    /// Segments scanned batch by batch.
    pub segments_scanned: usize,
    /// Segments whose indexes were rebuilt.
    pub indexes_rebuilt: usize,
    /// Where the log was cut, if it was: segment file, byte position and why.
    pub cut: Option<(PathBuf, u64, String)>,
    /// Segments deleted because they lay after the cut.
    pub segments_deleted: usize,
}

/// The state recovered from disk.
pub(crate) struct Recovered {
    pub segments: BTreeMap<u64, Arc<Segment>>,
    pub report: RecoveryReport,
}

/// Lists segment base offsets in `dir`, removing leftovers of interrupted
/// atomic writes and indexes without a log.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let io = |error| StorageError::io(dir, error);
    let mut bases = Vec::new();
    let mut index_files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        let Some((stem, extension)) = name.split_once('.') else {
            continue;
        };
        if stem.len() != FILE_NAME_DIGITS {
            continue;
        }
        let Ok(base) = stem.parse::<u64>() else {
            continue;
        };
        match extension {
            "log" => bases.push(base),
            "index" | "timeindex" => index_files.push((base, entry.path())),
            _ => {}
        }
    }
    bases.sort_unstable();
    for (base, path) in index_files {
        if bases.binary_search(&base).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(bases)
}

/// Opens and recovers every segment of the log in `dir`.
pub(crate) fn recover(dir: &Path, config: &LogConfig) -> Result<Recovered> {
    let clean = dir.join(CLEAN_SHUTDOWN_FILE).exists();
    let recovery_point = checkpoint::read_recovery_point(dir);
    let capacity = index::capacity_for(config.segment_bytes_max, config.index_interval_bytes);
    let bases = list_segments(dir)?;
    let mut report = RecoveryReport {
        clean,
        ..RecoveryReport::default()
    };
    let mut segments = BTreeMap::new();
    let mut expected_base: Option<u64> = None;

    for (position, base) in bases.iter().copied().enumerate() {
        let next_base = bases.get(position + 1).copied();
        if expected_base.is_some_and(|expected| expected != base) {
            // A gap or overlap between segments: the log ends before this one.
            report.cut.get_or_insert((
                dir.join(format!("{}.log", crate::segment::file_stem(base))),
                0,
                format!("segment base {base} does not continue offset {expected_base:?}"),
            ));
            delete_from(dir, &bases[position..], capacity, &mut report)?;
            break;
        }
        let last = next_base.is_none();
        let (segment, file_bytes) = Segment::open(
            dir,
            base,
            last.then_some(config.segment_bytes_max),
            capacity,
        )?;
        let may_hold_unsynced = next_base.is_none_or(|next| next > recovery_point);
        let scan = if !clean && may_hold_unsynced {
            report.segments_scanned += 1;
            report.indexes_rebuilt += 1;
            Some(full_scan(&segment, file_bytes, config))
        } else if last {
            Some(tail_scan(&segment, file_bytes, config, &mut report))
        } else if segment.indexes_valid(file_bytes)
            && sealed_tail_is_whole(&segment, file_bytes, next_base, config)
        {
            let max_timestamp_ms = segment
                .time_index
                .len()
                .checked_sub(1)
                .map_or(i64::MIN, |at| index::time_of(segment.time_index.entry(at)));
            segment.reset_published(file_bytes, next_base.unwrap_or(base), max_timestamp_ms);
            None
        } else {
            report.indexes_rebuilt += 1;
            Some(full_scan(&segment, file_bytes, config))
        };

        let mut ends_here = false;
        if let Some(end) = scan {
            segment.reset_published(end.bytes, end.next_offset, end.max_timestamp_ms);
            let short = !last && (end.bytes < file_bytes || next_base != Some(end.next_offset));
            if let Some(reason) = &end.cut {
                tracing::warn!(
                    path = %segment.path().display(),
                    position = end.bytes,
                    %reason,
                    "recovery cut the log at the first bad batch"
                );
                report.cut.get_or_insert((
                    segment.path().to_path_buf(),
                    end.bytes,
                    reason.to_string(),
                ));
            } else if short {
                report.cut.get_or_insert((
                    segment.path().to_path_buf(),
                    end.bytes,
                    "sealed segment ends early".to_string(),
                ));
            }
            ends_here = end.cut.is_some() || short;
            if ends_here || last {
                segment.cut_file(end.bytes)?;
            } else {
                // A sealed segment that was scanned: make its files canonical.
                segment.seal()?;
            }
        }
        if !last && !ends_here && !segment.is_sealed() {
            segment.mark_sealed();
        }
        expected_base = Some(segment.published_next_offset());
        segments.insert(base, Arc::new(segment));
        if ends_here {
            delete_from(dir, &bases[position + 1..], capacity, &mut report)?;
            let active = segments.values().next_back().cloned();
            if let Some(active) = active
                && active.is_sealed()
            {
                active.unseal()?;
            }
            break;
        }
    }
    if !segments.is_empty() {
        checkpoint::sync_dir(dir)?;
    }
    Ok(Recovered { segments, report })
}

/// A trusted sealed segment must end exactly at its file's end with the
/// offset the next segment starts at; checked by scanning from its last
/// index entry (at most an index interval and a batch).
fn sealed_tail_is_whole(
    segment: &Segment,
    file_bytes: u64,
    next_base: Option<u64>,
    config: &LogConfig,
) -> bool {
    let Some(at) = segment.offset_index.len().checked_sub(1) else {
        return file_bytes == 0;
    };
    let entry = segment.offset_index.entry(at);
    let end = segment.scan(
        u64::from(entry[1]),
        segment.base_offset() + u64::from(entry[0]),
        file_bytes,
        config.index_interval_bytes,
        false,
    );
    end.cut.is_none() && end.bytes == file_bytes && Some(end.next_offset) == next_base
}

/// Scans a whole segment from byte 0, rebuilding its indexes.
fn full_scan(segment: &Segment, file_bytes: u64, config: &LogConfig) -> ScanEnd {
    segment.offset_index.truncate_entries(0);
    segment.time_index.truncate_entries(0);
    segment.scan(
        0,
        segment.base_offset(),
        file_bytes,
        config.index_interval_bytes,
        true,
    )
}

/// After a clean shutdown: trust the active segment's indexes and scan only
/// from its last index entry (falling back to a full scan if they look wrong).
fn tail_scan(
    segment: &Segment,
    file_bytes: u64,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> ScanEnd {
    if !segment.indexes_valid(file_bytes) {
        report.indexes_rebuilt += 1;
        return full_scan(segment, file_bytes, config);
    }
    let (position, next_offset) = match segment.offset_index.len().checked_sub(1) {
        Some(at) => {
            let entry = segment.offset_index.entry(at);
            (
                u64::from(entry[1]),
                segment.base_offset() + u64::from(entry[0]),
            )
        }
        None => (0, segment.base_offset()),
    };
    let mut end = segment.scan(
        position,
        next_offset,
        file_bytes,
        config.index_interval_bytes,
        false,
    );
    let indexed_max = segment
        .time_index
        .len()
        .checked_sub(1)
        .map_or(i64::MIN, |at| index::time_of(segment.time_index.entry(at)));
    end.max_timestamp_ms = end.max_timestamp_ms.max(indexed_max);
    end
}

/// Deletes the segments starting at `bases` (they lie after a cut).
fn delete_from(
    dir: &Path,
    bases: &[u64],
    capacity: usize,
    report: &mut RecoveryReport,
) -> Result<()> {
    for base in bases {
        let (segment, _) = Segment::open(dir, *base, None, capacity)?;
        tracing::warn!(path = %segment.path().display(), "recovery deleted a segment after the cut");
        segment.delete_files()?;
        report.segments_deleted += 1;
    }
    Ok(())
}
