//! Handing freed memory back to the system.
//!
//! The binary's allocator is mimalloc (`main.rs`), which keeps freed pages for reuse and returns
//! them lazily. After a burst (parsing the kernel's BTF at start, a connection flood, a collector
//! backlog) the agent's resident memory would stay at the burst's peak long after its tables
//! shrank; on a node where the agent's memory limit is tight, that is what gets it killed.

/// Returns the pages mimalloc holds free to the system (a no-op for memory still in use). Costs
/// a walk over the allocator's segments: call it after a burst or every few seconds, not per
/// event.
pub(crate) fn release_freed() {
    // SAFETY: mi_collect has no preconditions; it only touches mimalloc's own free lists, and
    // is a cheap no-op when the process's allocator is not mimalloc.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
