//! Entry point for the fuzz target in `fuzz/` (`cargo +nightly fuzz run consumer_fetch`):
//! arbitrary bytes as the records of a Fetch response must decode or fail cleanly, never
//! panic, abort or allocate from a count nobody checked (a hostile or broken broker must not
//! take the application down). Not a stable API.

use std::sync::Arc;

/// Decodes `data` as a partition's records fetched from offset 0, read_uncommitted.
pub fn fetched_records(data: &[u8]) {
    let topic: Arc<str> = Arc::from("fuzz");
    let _ = crate::fetch::decode(&topic, 0, 0, bytes::Bytes::copy_from_slice(data), None);
}
