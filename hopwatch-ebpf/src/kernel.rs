//! Reads of kernel structs at offsets userspace computed from this kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so no offset is compiled in: userspace resolves each field
//! in `/sys/kernel/btf/vmlinux` and hands the result over as [`HOPWATCH_OFFSETS`]. A field this
//! kernel lacks is `u16::MAX`, and reads of it return `None`.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_probe_read_kernel, generated::bpf_get_socket_cookie,
};
use hopwatch_common::{AF_INET, AF_INET6, ConnState, Counter, EventHeader, KernelOffsets, Tuple};

use crate::maps::{HOPWATCH_OFFSETS, count};

pub const UNSET: u16 = u16::MAX;

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    HOPWATCH_OFFSETS.load()
}

/// Reads a `T` at `base + off` from kernel memory; `None` if the field is unknown or unreadable
/// (the latter is counted).
#[inline(always)]
pub unsafe fn read_at<T: Copy>(base: *const u8, off: u16) -> Option<T> {
    if off == UNSET || base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address; a fault is an error, not a crash.
    match unsafe { bpf_probe_read_kernel(base.add(off as usize).cast::<T>()) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadFailed);
            None
        }
    }
}

/// The kernel's socket cookie for `sk` (a BTF-typed `struct sock *` from a tp_btf argument).
#[inline(always)]
pub unsafe fn socket_cookie(sk: *const c_void) -> u64 {
    // SAFETY: the verifier checks that `sk` is a trusted `struct sock` pointer.
    unsafe { bpf_get_socket_cookie(sk.cast_mut()) }
}

/// `sk->sk_protocol` (a `u16` since 5.6, a `u8` bitfield neighbour before).
#[inline(always)]
pub unsafe fn sock_protocol(sk: *const u8, o: &KernelOffsets) -> Option<u16> {
    if o.sk_protocol_size == 1 {
        unsafe { read_at::<u8>(sk, o.sk_protocol) }.map(u16::from)
    } else {
        unsafe { read_at::<u16>(sk, o.sk_protocol) }
    }
}

/// Inode number of a `struct net`'s namespace.
#[inline(always)]
pub unsafe fn net_inum(net: *const u8, o: &KernelOffsets) -> u32 {
    unsafe { read_at::<u32>(net, o.net_inum) }.unwrap_or(0)
}

/// Fills `t` with `sk`'s local (`s*`) and remote (`d*`) address, ports and network namespace.
#[inline(always)]
pub unsafe fn read_sock_tuple(sk: *const u8, o: &KernelOffsets, t: &mut Tuple) {
    let family = unsafe { read_at::<u16>(sk, o.sk_family) }.unwrap_or(0);
    t.family = family;
    t.sport = unsafe { read_at::<u16>(sk, o.sk_num) }.unwrap_or(0);
    t.dport = u16::from_be(unsafe { read_at::<u16>(sk, o.sk_dport) }.unwrap_or(0));
    if family == AF_INET {
        if let Some(a) = unsafe { read_at::<[u8; 4]>(sk, o.sk_rcv_saddr) } {
            t.saddr[..4].copy_from_slice(&a);
        }
        if let Some(a) = unsafe { read_at::<[u8; 4]>(sk, o.sk_daddr) } {
            t.daddr[..4].copy_from_slice(&a);
        }
    } else if family == AF_INET6 {
        if let Some(a) = unsafe { read_at::<[u8; 16]>(sk, o.sk_v6_rcv_saddr) } {
            t.saddr = a;
        }
        if let Some(a) = unsafe { read_at::<[u8; 16]>(sk, o.sk_v6_daddr) } {
            t.daddr = a;
        }
    }
    if let Some(net) = unsafe { read_at::<*const u8>(sk, o.sk_net) } {
        t.netns = unsafe { net_inum(net, o) };
    }
}

/// Fills the process fields of `c` from the current task.
#[inline(always)]
pub fn current_process(c: &mut ConnState) {
    let pid_tgid = bpf_get_current_pid_tgid();
    c.pid = pid_tgid as u32;
    c.tgid = (pid_tgid >> 32) as u32;
    // SAFETY: no arguments; valid in every tracing context.
    c.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    c.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// Fills an event's process fields from the current task.
#[inline(always)]
pub fn current_process_into(pid_tgid: u64, header: &mut EventHeader, comm: &mut [u8; 16]) {
    header.pid = pid_tgid as u32;
    header.tgid = (pid_tgid >> 32) as u32;
    // SAFETY: no arguments; valid in every tracing context.
    header.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    *comm = bpf_get_current_comm().unwrap_or([0; 16]);
}
