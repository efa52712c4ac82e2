//! Disk work that may block for long (an fsync, creating files and directories) done from
//! code that runs on tokio's runtime threads.
//!
//! The broker's hot paths (appends to the page cache, reads from it) stay where they are:
//! handing each request to another thread cost about a third of the produce throughput
//! (measured with `examples/produce_load`). The rare, slow steps inside them (a segment roll
//! creates the new segment's file and writes the old one's index files; a topic is created
//! with its directories) go
//! through [`may_block`] instead: on a multi-threaded runtime it tells tokio that this thread
//! is about to block, so the runtime moves its other tasks to another thread meanwhile, and
//! every other connection keeps being served.

/// Runs `work`, which may block on the disk. On a multi-threaded tokio runtime's worker
/// thread this is `tokio::task::block_in_place`; anywhere else (the blocking pool, a
/// single-threaded runtime, no runtime) it simply runs `work`.
pub(crate) fn may_block<R>(work: impl FnOnce() -> R) -> R {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_threaded {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}
