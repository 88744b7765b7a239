//! Fill levels of the kernel side, read from outside its data path: the events ring buffer's
//! producer and consumer positions (its two control pages mapped read-only), the entries of the
//! hash maps (walked with `BPF_MAP_GET_NEXT_KEY`), and the kernel's run counters of the loaded
//! programs.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::{Ebpf, maps::Map};

/// The events ring buffer's control pages, mapped read-only.
pub(crate) struct RingbufGauge {
    base: *mut libc::c_void,
    page: usize,
    /// Data area size in bytes.
    pub size: u64,
    _fd: OwnedFd,
}

// SAFETY: the mapping is read-only and only read through atomic loads; the kernel and the
// consumer update those positions concurrently by design.
unsafe impl Send for RingbufGauge {}
// SAFETY: as above.
unsafe impl Sync for RingbufGauge {}

impl RingbufGauge {
    /// Maps the consumer and producer position pages of ring buffer `fd` (of `size` bytes).
    pub(crate) fn new(fd: BorrowedFd<'_>, size: u64) -> io::Result<Self> {
        let fd = fd.try_clone_to_owned()?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("no page size"))?;
        // SAFETY: a fresh shared read-only mapping of the map's first two pages (consumer page,
        // producer page), which the kernel allows any ring buffer fd to map read-only.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { base, page, size, _fd: fd })
    }

    /// Bytes written by the kernel and not yet consumed by the agent.
    #[must_use]
    #[expect(clippy::cast_ptr_alignment, reason = "both positions start a page")]
    pub(crate) fn used_bytes(&self) -> u64 {
        // SAFETY: both positions are page-aligned u64s inside the live mapping.
        let (consumer, producer) = unsafe {
            let c = &*self.base.cast::<AtomicU64>();
            let p = &*self.base.cast::<u8>().add(self.page).cast::<AtomicU64>();
            (c.load(Ordering::Acquire), p.load(Ordering::Acquire))
        };
        producer.saturating_sub(consumer).min(self.size)
    }
}

impl Drop for RingbufGauge {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base, 2 * self.page) };
    }
}

/// A hash map of the kernel object whose entries can be counted.
pub(crate) struct KernelMap {
    pub name: String,
    pub capacity: u64,
    key_size: usize,
    fd: OwnedFd,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

impl KernelMap {
    /// Entries now, walking the keys (at most `capacity` steps: a walk that races deletions can
    /// restart from the first key, so the count is an estimate capped at the capacity).
    pub(crate) fn count(&self) -> io::Result<u64> {
        let mut key = vec![0u8; self.key_size];
        let mut next = vec![0u8; self.key_size];
        let mut n = 0u64;
        let mut first = true;
        while n < self.capacity {
            let attr = NextKeyAttr {
                map_fd: u32::try_from(self.fd.as_raw_fd()).unwrap_or(u32::MAX),
                _pad: 0,
                key: if first { 0 } else { key.as_ptr() as u64 },
                next_key: next.as_mut_ptr() as u64,
                flags: 0,
            };
            // SAFETY: a valid attr for BPF_MAP_GET_NEXT_KEY; both buffers are key_size long.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_GET_NEXT_KEY,
                    &raw const attr,
                    size_of::<NextKeyAttr>(),
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return if e.raw_os_error() == Some(libc::ENOENT) { Ok(n) } else { Err(e) };
            }
            n += 1;
            first = false;
            std::mem::swap(&mut key, &mut next);
        }
        Ok(n)
    }
}

/// The hash maps of `ebpf` (those whose entries come and go).
#[must_use]
pub(crate) fn hash_maps(ebpf: &Ebpf) -> Vec<KernelMap> {
    ebpf.maps()
        .filter_map(|(name, map)| {
            let (Map::HashMap(data)
            | Map::LruHashMap(data)
            | Map::PerCpuHashMap(data)
            | Map::PerCpuLruHashMap(data)) = map
            else {
                return None;
            };
            let info = data.info().ok()?;
            let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
            Some(KernelMap {
                name: name.to_owned(),
                capacity: info.max_entries().into(),
                key_size: usize::try_from(info.key_size()).ok()?,
                fd,
            })
        })
        .collect()
}

/// Names and kernel ids of `ebpf`'s loaded programs.
#[must_use]
pub(crate) fn program_ids(ebpf: &Ebpf) -> Vec<(String, u32)> {
    ebpf.programs().filter_map(|(name, p)| Some((name.to_owned(), p.info().ok()?.id()))).collect()
}

/// Run count and run time of each program in `ids` (non-zero only while the kernel's BPF
/// statistics are on, `hopwatch agent --bpf-stats`).
#[must_use]
pub(crate) fn program_runs(ids: &[(String, u32)]) -> Vec<(String, u64, Duration)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| {
            let name = ids.iter().find(|(_, id)| *id == info.id())?.0.clone();
            Some((name, info.run_count(), info.run_time()))
        })
        .collect()
}
