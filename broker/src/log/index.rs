//! Sparse indexes of one segment: offset → file position, and timestamp → offset.
//!
//! Both are kept in memory and written to `<base>.index` / `<base>.timeindex` when a segment is
//! sealed (rolled) or the log is closed. On open, a sealed segment's files are trusted only if
//! they are consistent (size a multiple of the entry size, entries increasing, positions inside
//! the log file); otherwise they are rebuilt by scanning the segment. The active segment's
//! indexes are always rebuilt by recovery's scan.
//!
//! References: Kafka `OffsetIndex` and `TimeIndex` (8- and 12-byte entries).

use std::path::Path;

/// Offset index: (offset relative to the segment base, byte position of the batch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OffsetIndex {
    entries: Vec<(u32, u32)>,
}

impl OffsetIndex {
    pub(crate) fn push(&mut self, relative_offset: u32, position: u32) {
        if self
            .entries
            .last()
            .is_none_or(|&(o, p)| relative_offset > o && position > p)
        {
            self.entries.push((relative_offset, position));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Position of the last indexed batch starting at or before `relative_offset` (0 if none).
    pub(crate) fn lookup(&self, relative_offset: u32) -> u32 {
        let at = self.entries.partition_point(|&(o, _)| o <= relative_offset);
        if at == 0 { 0 } else { self.entries[at - 1].1 }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 8);
        for (offset, position) in &self.entries {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&position.to_be_bytes());
        }
        out
    }

    /// Parses a persisted index; `None` if it is inconsistent with a log of `log_size` bytes.
    pub(crate) fn from_bytes(bytes: &[u8], log_size: u64) -> Option<Self> {
        if !bytes.len().is_multiple_of(8) {
            return None;
        }
        let mut index = Self::default();
        for chunk in bytes.chunks_exact(8) {
            let offset = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let position = u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            if u64::from(position) >= log_size.max(1) {
                return None;
            }
            if let Some(&(o, p)) = index.entries.last()
                && (offset <= o || position <= p)
            {
                return None;
            }
            index.entries.push((offset, position));
        }
        Some(index)
    }
}

/// Time index: (largest timestamp so far in the segment, relative offset of the batch that
/// raised it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TimeIndex {
    entries: Vec<(i64, u32)>,
}

impl TimeIndex {
    pub(crate) fn push(&mut self, timestamp: i64, relative_offset: u32) {
        if self
            .entries
            .last()
            .is_none_or(|&(t, o)| timestamp > t && relative_offset > o)
        {
            self.entries.push((timestamp, relative_offset));
        }
    }

    /// A relative offset from which a scan for the first batch with a timestamp >= `target`
    /// may start: every batch before it has a smaller timestamp.
    pub(crate) fn scan_start(&self, target: i64) -> u32 {
        let at = self.entries.partition_point(|&(t, _)| t < target);
        if at == 0 { 0 } else { self.entries[at - 1].1 }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 12);
        for (timestamp, offset) in &self.entries {
            out.extend_from_slice(&timestamp.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
        }
        out
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(12) {
            return None;
        }
        let mut index = Self::default();
        for chunk in bytes.chunks_exact(12) {
            let mut t = [0u8; 8];
            t.copy_from_slice(&chunk[..8]);
            let timestamp = i64::from_be_bytes(t);
            let offset = u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
            if let Some(&(pt, po)) = index.entries.last()
                && (timestamp <= pt || offset <= po)
            {
                return None;
            }
            index.entries.push((timestamp, offset));
        }
        Some(index)
    }
}

/// Reads a persisted index file; `None` if it is missing or unreadable.
pub(crate) fn read_file(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_lookup_and_round_trip() {
        let mut index = OffsetIndex::default();
        index.push(0, 0);
        index.push(10, 4096);
        index.push(25, 9000);
        assert_eq!(index.lookup(0), 0);
        assert_eq!(index.lookup(9), 0);
        assert_eq!(index.lookup(10), 4096);
        assert_eq!(index.lookup(30), 9000);
        let bytes = index.to_bytes();
        assert_eq!(OffsetIndex::from_bytes(&bytes, 10_000), Some(index));
        assert_eq!(
            OffsetIndex::from_bytes(&bytes, 5_000),
            None,
            "position beyond the log"
        );
        assert_eq!(
            OffsetIndex::from_bytes(&bytes[..7], 10_000),
            None,
            "torn entry"
        );
    }

    #[test]
    fn time_index_scan_start() {
        let mut index = TimeIndex::default();
        index.push(100, 0);
        index.push(200, 5);
        index.push(150, 7); // not an increase: ignored
        index.push(300, 9);
        assert_eq!(index.scan_start(50), 0);
        assert_eq!(index.scan_start(150), 0);
        assert_eq!(index.scan_start(250), 5);
        assert_eq!(index.scan_start(1000), 9);
        assert_eq!(TimeIndex::from_bytes(&index.to_bytes()), Some(index));
    }
}
