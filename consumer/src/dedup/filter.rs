//! An in-memory filter of the keys in one mark bucket, in front of RocksDB.
//!
//! Most keys a consumer checks are fresh, and a fresh key is exactly the case where RocksDB
//! does the most work to say "absent": a search of every memtable and, per SST, a filter
//! probe. This filter answers "certainly absent" from one or a few cache lines, so a fresh key
//! costs no RocksDB read at all; only a key the filter may hold (a duplicate, or a false
//! positive, about 1 % of fresh keys) is read from RocksDB.
//!
//! It never forgets a key it was given: every key written to a bucket is added before the
//! write, and a store's open adds every key found in the bucket. A key deleted from the bucket
//! (a released claim) stays in the filter, which only costs a read.
//!
//! A blocked Bloom filter (one 64-byte block per key, six bits set in it, about 12 bits per
//! key). Its size cannot change once made, so it grows in parts: when the newest part is
//! full, a part twice as large is added; a lookup probes each part. A new bucket starts
//! with a part as large as the bucket before it ended, so a steady stream needs one part per
//! bucket. A key the filter already answers "maybe" for is not added again (a claim record
//! and then the mark of the same key count once). Memory: 1.5 bytes (12 bits) per key
//! in a full part; a bucket that outgrew its first part holds up to twice that.

use super::store::KeyHash;

/// Bits per key, and bits set per key (inside one block).
const BITS_PER_KEY: usize = 12;
const PROBES: u32 = 6;
/// The smallest part, in keys.
const MIN_CAPACITY: usize = 1 << 16;
const GROWTH: usize = 2;

#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

#[derive(Debug)]
struct Part {
    blocks: Vec<Block>,
    capacity: usize,
    len: usize,
}

impl Part {
    fn new(capacity: usize) -> Self {
        let bits = capacity.saturating_mul(BITS_PER_KEY);
        let blocks = bits.div_ceil(512).max(1);
        Self {
            blocks: vec![Block::default(); blocks],
            capacity,
            len: 0,
        }
    }

    /// The block for `hash` and the six bit positions in it.
    fn positions(&self, hash: u128) -> (usize, [u16; PROBES as usize]) {
        let high = (hash >> 64) as u64;
        let low = hash as u64;
        // Multiply-shift instead of a modulo: `high` spread over the blocks.
        let block = ((u128::from(high) * self.blocks.len() as u128) >> 64) as usize;
        let mut bits = [0u16; PROBES as usize];
        for (i, bit) in bits.iter_mut().enumerate() {
            // Nine bits of `low` per probe: 6 × 9 = 54 of its 64.
            *bit = ((low >> (9 * i)) & 511) as u16;
        }
        (block, bits)
    }

    fn insert(&mut self, hash: u128) {
        let (block, bits) = self.positions(hash);
        let block = &mut self.blocks[block].0;
        for bit in bits {
            block[usize::from(bit >> 6)] |= 1 << (bit & 63);
        }
        self.len += 1;
    }

    fn may_contain(&self, hash: u128) -> bool {
        let (block, bits) = self.positions(hash);
        let block = &self.blocks[block].0;
        bits.iter()
            .all(|&bit| block[usize::from(bit >> 6)] & (1 << (bit & 63)) != 0)
    }
}

/// The keys of one bucket: no false negatives, about 1 % false positives.
#[derive(Debug)]
pub(crate) struct KeyFilter {
    parts: Vec<Part>,
    /// Says "maybe" to every key (a bucket it could not be built for).
    everything: bool,
}

impl KeyFilter {
    /// A filter sized for `expected` keys (it grows past that as needed).
    pub(crate) fn with_capacity(expected: usize) -> Self {
        Self {
            parts: vec![Part::new(expected.max(MIN_CAPACITY))],
            everything: false,
        }
    }

    /// A filter that refuses no key.
    pub(crate) fn everything() -> Self {
        Self {
            everything: true,
            ..Self::with_capacity(0)
        }
    }

    pub(crate) fn insert(&mut self, key: KeyHash) {
        if self.may_contain(key) {
            // Already answered "maybe": adding it changes no answer.
            return;
        }
        let hash = key.0;
        let newest = self.parts.last_mut().expect("a filter has a part");
        if newest.len < newest.capacity {
            newest.insert(hash);
            return;
        }
        let capacity = newest.capacity.saturating_mul(GROWTH);
        let mut part = Part::new(capacity);
        part.insert(hash);
        self.parts.push(part);
    }

    /// False only if the key was never inserted.
    pub(crate) fn may_contain(&self, key: KeyHash) -> bool {
        // Newest (largest) last: the common fresh key is refused by every part anyway.
        self.everything || self.parts.iter().any(|part| part.may_contain(key.0))
    }

    /// Keys inserted.
    pub(crate) fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.blocks.len() * std::mem::size_of::<Block>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> KeyHash {
        KeyHash::new("g", "t", &n.to_be_bytes())
    }

    #[test]
    fn every_inserted_key_is_found_across_growth() {
        let mut filter = KeyFilter::with_capacity(0);
        let n = 300_000;
        for i in 0..n {
            filter.insert(key(i));
        }
        assert!(filter.parts.len() > 1, "{} parts", filter.parts.len());
        // A key the filter already said "maybe" for is not counted again.
        let len = filter.len() as u64;
        assert!(len <= n && len > n * 97 / 100, "{len} of {n} counted");
        let missing = (0..n).filter(|&i| !filter.may_contain(key(i))).count();
        assert_eq!(missing, 0);
    }

    #[test]
    fn false_positives_stay_near_one_percent() {
        let mut filter = KeyFilter::with_capacity(100_000);
        for i in 0..100_000 {
            filter.insert(key(i));
        }
        let trials = 200_000u64;
        let false_positives = (1_000_000..1_000_000 + trials)
            .filter(|&i| filter.may_contain(key(i)))
            .count();
        let rate = false_positives as f64 / trials as f64;
        assert!(rate < 0.02, "false positive rate {rate}");
        let bytes_per_key = filter.bytes() as f64 / 100_000.0;
        assert!(bytes_per_key < 1.7, "{bytes_per_key} bytes per key");
    }
}
