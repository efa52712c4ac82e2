//! Marks written as batch records: one RocksDB value per `mark_done` call instead of one
//! key per mark, with an exact in-memory index of the marks they hold.
//!
//! Inserting one key per mark into RocksDB costs about a microsecond each (a skip-list insert
//! into the memtable, then a flush and compactions of random 16-byte keys): more than the rest
//! of the middleware together. A batch record is one sequential key whose value lists the
//! batch's keys, written in the same `WriteBatch` as the offsets and state, so it is as
//! atomic and as durable as a mark of its own. The keys it holds are answered from memory
//! ([`Recent`]), exactly (no false positives: a duplicate is found without a read, a fresh key
//! is never taken for one).
//!
//! The index is bounded (`DedupConfig::memory_marks`). Once it is full, marks are written one
//! RocksDB key each, as before records existed, until a bucket's expiry frees memory. An open
//! reads the batch records of the live buckets back into memory; when they exceed the bound
//! (a smaller one than they were written under), the oldest records are *spilled*: one
//! `WriteBatch` puts a mark per key and deletes the record, and the keys leave memory (the
//! bucket's Bloom filter and RocksDB answer for them from then on).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use super::store::KeyHash;

/// First byte of a batch record's key. The key is 9 bytes long; a mark's key is 16, so the
/// two never meet in a bucket.
const BATCH_TAG: u8 = b'B';
/// First byte of a batch record's value.
const BATCH_FORMAT: u8 = 1;

/// The key of batch record `seq` in its bucket.
pub(super) fn batch_key(seq: u64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = BATCH_TAG;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence of a batch record's key, or `None` for any other key.
pub(super) fn parse_batch_key(key: &[u8]) -> Option<u64> {
    match key {
        [BATCH_TAG, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// A batch record's value: its format, the time its marks were made, then each key's 16
/// bytes.
pub(super) fn encode_batch(at_ms: i64, keys: &[KeyHash]) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + 16 * keys.len());
    value.push(BATCH_FORMAT);
    value.extend_from_slice(&at_ms.to_be_bytes());
    for key in keys {
        value.extend_from_slice(&key.to_bytes());
    }
    value
}

/// The time and keys of a batch record's value.
///
/// # Errors
/// Why the value is not a batch record this version can read.
pub(super) fn decode_batch(value: &[u8]) -> Result<(i64, Vec<KeyHash>), String> {
    let Some((&format, rest)) = value.split_first() else {
        return Err("empty batch record".into());
    };
    if format != BATCH_FORMAT {
        return Err(format!("batch record format {format}"));
    }
    if rest.len() < 8 || (rest.len() - 8) % 16 != 0 {
        return Err(format!("batch record of {} bytes", value.len()));
    }
    let (at, keys) = rest.split_at(8);
    let at_ms = i64::from_be_bytes(at.try_into().map_err(|_| "short time")?);
    let keys = keys
        .chunks_exact(16)
        .map(|chunk| {
            let mut bytes = [0; 16];
            bytes.copy_from_slice(chunk);
            KeyHash::from_bytes(bytes)
        })
        .collect();
    Ok((at_ms, keys))
}

/// A key as two words: 8-byte aligned, so an entry of the index takes 24 bytes (a `u128`
/// is 16-byte aligned, which would make it 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64, u64);

impl From<KeyHash> for Packed {
    fn from(key: KeyHash) -> Self {
        Self((key.0 >> 64) as u64, key.0 as u64)
    }
}

impl Hash for Packed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The key is a hash already.
        state.write_u64(self.0 ^ self.1);
    }
}

/// Hashes a `Packed` (or a [`KeyHash`]) with a seed drawn per map: keys come from message ids
/// that whoever sends the messages chooses, so a fixed mapping to slots could be attacked with
/// keys made to share slots (inserts then take time in the square of their number). Mixing
/// with an unknown seed (a folded multiply) leaves nothing to aim at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seeded(u64);

impl Default for Seeded {
    fn default() -> Self {
        Self(std::collections::hash_map::RandomState::new().hash_one(0u64))
    }
}

impl BuildHasher for Seeded {
    type Hasher = Folded;

    fn build_hasher(&self) -> Folded {
        Folded {
            seed: self.0,
            hash: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Folded {
    seed: u64,
    hash: u64,
}

impl Folded {
    fn mix(&mut self, value: u64) {
        let product =
            u128::from(value ^ self.seed ^ self.hash) * u128::from(0x9e37_79b9_7f4a_7c15_u64);
        self.hash = (product >> 64) as u64 ^ product as u64;
    }
}

impl Hasher for Folded {
    fn finish(&self) -> u64 {
        self.hash
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `Packed`; correct all the same.
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    fn write_u128(&mut self, value: u128) {
        // A `KeyHash`: a hash already, so its halves folded into one word are enough.
        self.mix((value >> 64) as u64 ^ value as u64);
    }
}

/// One bucket's batch records still held in memory, and the marks they hold.
#[derive(Debug, Default)]
pub(super) struct Recent {
    /// Each key of the held records, with the newest record holding it.
    marks: HashMap<Packed, u64, Seeded>,
    /// The held records, oldest first: sequence, time of their marks.
    batches: VecDeque<(u64, i64)>,
}

impl Recent {
    /// The time of `key`'s mark, when a held record has it.
    pub(super) fn get(&self, key: KeyHash) -> Option<i64> {
        let seq = *self.marks.get(&Packed::from(key))?;
        let at = self.batches.partition_point(|&(s, _)| s < seq);
        self.batches
            .get(at)
            .filter(|&&(s, _)| s == seq)
            .map(|&(_, at_ms)| at_ms)
    }

    /// Adds record `seq`, whose marks were made at `at_ms`. Records come in sequence order,
    /// so a key already held now counts from this later record.
    pub(super) fn insert(&mut self, seq: u64, at_ms: i64, keys: &[KeyHash]) {
        self.marks.reserve(keys.len());
        for &key in keys {
            self.marks.insert(Packed::from(key), seq);
        }
        self.batches.push_back((seq, at_ms));
    }

    /// The oldest record held: its sequence.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.batches.front().map(|&(seq, _)| seq)
    }

    /// Forgets the oldest record, whose keys are `keys` (read back from it), once their marks
    /// are stored one key each. A key that a later held record has too stays.
    pub(super) fn remove_oldest(&mut self, keys: &[KeyHash]) {
        let Some((seq, _)) = self.batches.pop_front() else {
            return;
        };
        for &key in keys {
            let packed = Packed::from(key);
            if self.marks.get(&packed) == Some(&seq) {
                self.marks.remove(&packed);
            }
        }
    }

    /// Gives back the memory of records forgotten.
    pub(super) fn shrink(&mut self) {
        self.marks.shrink_to_fit();
        self.batches.shrink_to_fit();
    }

    /// Marks held.
    pub(super) fn len(&self) -> usize {
        self.marks.len()
    }

    /// Bytes of the index, about.
    pub(super) fn bytes(&self) -> usize {
        // An entry (24 bytes) and its control byte per slot.
        self.marks.capacity() * 25 + self.batches.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u128) -> KeyHash {
        KeyHash(n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
    }

    #[test]
    fn batch_records_round_trip_and_refuse_what_they_are_not() {
        let keys = [key(1), key(2), key(3)];
        let value = encode_batch(1_234, &keys);
        assert_eq!(decode_batch(&value), Ok((1_234, keys.to_vec())));
        assert!(decode_batch(&value[..value.len() - 1]).is_err());
        assert!(decode_batch(&[]).is_err());
        let mut newer = value.clone();
        newer[0] = 2;
        assert!(decode_batch(&newer).is_err());
        assert_eq!(parse_batch_key(&batch_key(7)), Some(7));
        assert_eq!(parse_batch_key(&key(1).to_bytes()), None);
        assert_eq!(parse_batch_key(b"B"), None);
    }

    #[test]
    fn a_key_held_by_a_later_record_stays_when_the_older_one_leaves() {
        let mut recent = Recent::default();
        recent.insert(1, 100, &[key(1), key(2)]);
        recent.insert(2, 200, &[key(2), key(3)]);
        assert_eq!(recent.get(key(2)), Some(200));
        assert_eq!(recent.oldest(), Some(1));
        recent.remove_oldest(&[key(1), key(2)]);
        assert_eq!(recent.get(key(1)), None);
        assert_eq!(recent.get(key(2)), Some(200));
        assert_eq!(recent.get(key(3)), Some(200));
        assert_eq!(recent.oldest(), Some(2));
        recent.remove_oldest(&[key(2), key(3)]);
        assert_eq!(recent.len(), 0);
        assert_eq!(recent.oldest(), None);
    }

    #[test]
    fn records_of_the_same_millisecond_keep_their_keys_until_the_last_leaves() {
        let mut recent = Recent::default();
        recent.insert(1, 100, &[key(1)]);
        recent.insert(2, 100, &[key(1), key(2)]);
        recent.remove_oldest(&[key(1)]);
        assert_eq!(recent.get(key(1)), Some(100));
        recent.remove_oldest(&[key(1), key(2)]);
        assert_eq!(recent.len(), 0);
    }
}
