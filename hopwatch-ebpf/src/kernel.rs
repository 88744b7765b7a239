//! Reads of kernel structs at offsets userspace computed from this kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so no offset is compiled in: userspace resolves each field
//! in `/sys/kernel/btf/vmlinux` and hands the result over as [`HOPWATCH_OFFSETS`]. A field this
//! kernel lacks is `u16::MAX`, and reads of it return `None`. A struct the kernel handed over
//! typed is read with plain loads ([`load_at`], offsets through [`offset!`] so that the verifier
//! knows them); anything else through `bpf_probe_read_kernel` ([`read_at`]); [`Mem`] picks one.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_probe_read_kernel, bpf_probe_read_user,
    generated::{bpf_get_current_task, bpf_get_socket_cookie},
};
use hopwatch_common::{AF_INET, AF_INET6, ConnState, Counter, EventHeader, KernelOffsets, Tuple};

use crate::maps::{HOPWATCH_OFFSETS, count};

pub const UNSET: u16 = u16::MAX;
/// `S_IFMT` and `S_IFSOCK` of an inode's `i_mode`.
const S_IFMT: u16 = 0o170_000;
const S_IFSOCK: u16 = 0o140_000;
/// Marks a cookie made from the socket's address (no kernel cookie yet).
const ADDRESS_COOKIE: u64 = 1 << 63;

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    HOPWATCH_OFFSETS.load()
}

/// One field of [`HOPWATCH_OFFSETS`], read on its own: the globals are a frozen read-only map,
/// so the verifier knows the value and accepts it as a constant offset into a BTF-typed pointer
/// (see [`load_at`]). A copy of the whole struct on the stack loses that.
macro_rules! offset {
    ($field:ident) => {
        $crate::kernel::offset_field::<
            { core::mem::offset_of!(hopwatch_common::KernelOffsets, $field) },
        >()
    };
}
pub(crate) use offset;

/// What [`offset!`] reads: the `u16` at byte `AT` of the global (every field is one).
#[inline(always)]
pub fn offset_field<const AT: usize>() -> u16 {
    const { assert!(AT + 2 <= size_of::<KernelOffsets>() && AT % 2 == 0) };
    let base = core::ptr::from_ref(&HOPWATCH_OFFSETS).cast::<u8>();
    // SAFETY: `Global` is `repr(transparent)` over the value, which is always initialised; `AT`
    // is a field's offset inside it.
    unsafe { core::ptr::read_volatile(base.add(AT).cast::<u16>()) }
}

/// Reads a `T` at `base + off` with a plain load: for pointers the kernel handed over typed
/// (a `tp_btf` argument, `bpf_task_pt_regs`), where the verifier turns the load into one that
/// cannot fault (a bad address reads zeroes) — a few instructions instead of a helper call. `off`
/// must come from [`offset!`] so that the verifier knows it; `None` for a field this kernel lacks.
///
/// # Safety
///
/// `base` is a BTF-typed pointer the verifier tracks as such, and `off` is a field of its type
/// that holds a `T`.
#[inline(always)]
pub unsafe fn load_at<T: Plain>(base: *const u8, off: u16) -> Option<T> {
    if off == UNSET || base.is_null() {
        return None;
    }
    // SAFETY: the caller's contract; the verifier checks the access against the type.
    Some(unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) })
}

/// How a kernel struct is read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    /// With plain loads ([`load_at`]): the pointer is one the kernel handed over typed (a
    /// `tp_btf` argument, `bpf_task_pt_regs`), or a pointer field read from such a struct.
    Typed,
    /// Through the probe helper ([`read_at`]): anything else.
    Probe,
}

impl Mem {
    /// Reads the `T` at `base + off`; `off` comes from [`offset!`].
    ///
    /// # Safety
    ///
    /// With [`Mem::Typed`], as for [`load_at`].
    #[inline(always)]
    pub unsafe fn read<T: Plain>(self, base: *const u8, off: u16) -> Option<T> {
        match self {
            // SAFETY: the caller's contract.
            Mem::Typed => unsafe { load_at(base, off) },
            Mem::Probe => read_at(base, off),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Plain data: every bit pattern is a valid value, so bytes copied from anywhere make one.
/// Integers, fixed-size arrays of plain data, and raw pointers (a pointer read this way is only
/// ever read through [`read_at`] again, never dereferenced). Sealed: a type with invalid bit
/// patterns (`bool`, `char`, references, enums) must never be read from foreign memory.
pub trait Plain: Copy + sealed::Sealed {}

macro_rules! plain {
    ($($t:ty),*) => { $(impl sealed::Sealed for $t {} impl Plain for $t {})* };
}
plain!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);
impl<T: Plain, const N: usize> sealed::Sealed for [T; N] {}
impl<T: Plain, const N: usize> Plain for [T; N] {}
impl<T> sealed::Sealed for *const T {}
impl<T> Plain for *const T {}
impl<T> sealed::Sealed for *mut T {}
impl<T> Plain for *mut T {}

/// Reads a `T` at `base + off` from kernel memory; `None` if the field is unknown or unreadable
/// (the latter is counted). Safe for any `base`: the read goes through `bpf_probe_read_kernel`,
/// for which a bad address is an error, not a crash, and `T` is [`Plain`].
#[inline(always)]
pub fn read_at<T: Plain>(base: *const u8, off: u16) -> Option<T> {
    if off == UNSET || base.is_null() {
        return None;
    }
    let at = base.wrapping_add(off as usize).cast::<T>();
    // SAFETY: bpf_probe_read_kernel copes with any address (a fault is an error), and any bytes
    // it copies are a valid `T` (`Plain`).
    match unsafe { bpf_probe_read_kernel(at) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ReadFailed);
            None
        }
    }
}

/// Reads a `T` at user address `addr` (of the current task); `None` if it is unreadable. Safe
/// for any `addr`: `bpf_probe_read_user` treats a bad or paged-out address as an error, and `T`
/// is [`Plain`]. Failures are not counted: user memory that is not resident is routine.
#[inline(always)]
pub fn read_user<T: Plain>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user copes with any address (a fault is an error), and any bytes it
    // copies are a valid `T` (`Plain`).
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// The `struct sock *` behind file descriptor `fd` of the current task, if it is a socket.
pub fn fd_socket(fd: u64, o: &KernelOffsets) -> Option<*const u8> {
    // SAFETY: no arguments; the task pointer is only read through `read_at`.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files = read_at::<*const u8>(task, o.task_files)?;
    let fdt = read_at::<*const u8>(files, o.files_fdt)?;
    let max = read_at::<u32>(fdt, o.fdt_max_fds)?;
    if fd >= u64::from(max) {
        return None;
    }
    let table = read_at::<u64>(fdt, o.fdt_fd)?;
    let file = read_at::<*const u8>((table + fd * 8) as *const u8, 0)?;
    let inode = read_at::<*const u8>(file, o.file_inode)?;
    if read_at::<u16>(inode, o.inode_mode)? & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket = read_at::<*const u8>(file, o.file_private_data)?;
    read_at::<*const u8>(socket, o.socket_sk)
}

/// The cookie of a socket read from kernel memory (not handed over by the kernel, so
/// `bpf_get_socket_cookie` is refused): the kernel's once anything asked for it, which every
/// socket the socket-layer hooks or `sock_ops` saw has, else one made from its address.
#[inline(always)]
pub fn read_cookie(sk: *const u8, o: &KernelOffsets) -> u64 {
    // A plain value, not a match on the `Option`: LLVM may branch on the payload of `None`, an
    // uninitialised register the verifier refuses to read (6.1 does).
    let cookie = read_at::<u64>(sk, o.sk_cookie).unwrap_or(0);
    if cookie != 0 { cookie } else { sk as u64 | ADDRESS_COOKIE }
}

/// The kernel's socket cookie for `sk`: read where the kernel keeps it once anything asked for
/// it (every socket `sock_ops` saw has one), else made by the helper.
///
/// # Safety
///
/// `sk` must be a BTF-typed `struct sock *` the program was handed (a tp_btf argument); the
/// verifier refuses to load a program that passes anything else.
#[inline(always)]
pub unsafe fn socket_cookie(sk: *const c_void) -> u64 {
    // SAFETY: the caller passes a trusted `struct sock` pointer, which the verifier checks;
    // `sk_cookie` is its field.
    match unsafe { load_at::<u64>(sk.cast(), offset!(sk_cookie)) } {
        Some(cookie) if cookie != 0 => cookie,
        // SAFETY: as above.
        _ => unsafe { bpf_get_socket_cookie(sk.cast_mut()) },
    }
}

/// A socket's (local, remote) ports, 0 where unreadable.
///
/// # Safety
///
/// As for [`Mem::read`]: with [`Mem::Typed`], `sk` is a BTF-typed `struct sock *`.
#[inline(always)]
pub unsafe fn sock_ports(mem: Mem, sk: *const u8) -> (u16, u16) {
    // SAFETY: the caller's contract; both are fields of `struct sock`.
    unsafe {
        let sport = mem.read::<u16>(sk, offset!(sk_num)).unwrap_or(0);
        let dport = u16::from_be(mem.read::<u16>(sk, offset!(sk_dport)).unwrap_or(0));
        (sport, dport)
    }
}

/// `sk->sk_protocol` (a `u16` since 5.6, a `u8` bitfield neighbour before).
///
/// # Safety
///
/// As for [`sock_ports`].
#[inline(always)]
pub unsafe fn sock_protocol(mem: Mem, sk: *const u8) -> Option<u16> {
    // SAFETY: the caller's contract; a field of `struct sock`.
    unsafe {
        if offset!(sk_protocol_size) == 1 {
            mem.read::<u8>(sk, offset!(sk_protocol)).map(u16::from)
        } else {
            mem.read::<u16>(sk, offset!(sk_protocol))
        }
    }
}

/// Inode number of a `struct net`'s namespace.
///
/// # Safety
///
/// As for [`Mem::read`]: with [`Mem::Typed`], `net` is a BTF-typed `struct net *`.
#[inline(always)]
pub unsafe fn net_inum(mem: Mem, net: *const u8) -> u32 {
    // SAFETY: the caller's contract; a field of `struct net`.
    unsafe { mem.read::<u32>(net, offset!(net_inum)) }.unwrap_or(0)
}

/// Fills `t` with `sk`'s local (`s*`) and remote (`d*`) address, ports and network namespace.
///
/// # Safety
///
/// As for [`sock_ports`].
#[inline(always)]
pub unsafe fn read_sock_tuple(mem: Mem, sk: *const u8, t: &mut Tuple) {
    // SAFETY: the caller's contract; fields of `struct sock`, and `sk_net`'s `struct net`.
    unsafe {
        let family = mem.read::<u16>(sk, offset!(sk_family)).unwrap_or(0);
        t.family = family;
        (t.sport, t.dport) = sock_ports(mem, sk);
        if family == AF_INET {
            if let Some(a) = mem.read::<[u8; 4]>(sk, offset!(sk_rcv_saddr)) {
                t.saddr[..4].copy_from_slice(&a);
            }
            if let Some(a) = mem.read::<[u8; 4]>(sk, offset!(sk_daddr)) {
                t.daddr[..4].copy_from_slice(&a);
            }
        } else if family == AF_INET6 {
            if let Some(a) = mem.read::<[u8; 16]>(sk, offset!(sk_v6_rcv_saddr)) {
                t.saddr = a;
            }
            if let Some(a) = mem.read::<[u8; 16]>(sk, offset!(sk_v6_daddr)) {
                t.daddr = a;
            }
        }
        if let Some(net) = mem.read::<*const u8>(sk, offset!(sk_net)) {
            t.netns = net_inum(mem, net);
        }
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
