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

/// Asks the kernel not to back this process's memory with transparent huge pages. mimalloc
/// advises huge pages for its arenas; a 2 MiB page is resident as a whole however little of it
/// is used, and with tables of small entries that come and go (connections) most of the
/// agent's anonymous memory was such pages (114 of 152 MiB with 100k connections open, `cargo
/// xtask bench --only memory`). Applies to memory faulted in from now on. Returns whether they
/// are off (the benchmarks require it, to measure the allocator the binary runs with).
pub fn no_huge_pages() -> bool {
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers; it only sets a flag on
    // this process's address space.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot turn huge pages off");
    }
    r == 0
}
