//! Loads hopwatch's kernel object, hands it this kernel's struct offsets and the agent's settings,
//! and attaches its programs. Everything attached is a BPF link owned by this process: when the
//! agent exits, however it exits (SIGKILL included), the kernel detaches it. Nothing is pinned and
//! no tc filter is installed, so a crashed agent leaves nothing behind.

pub(crate) mod btf;
pub(crate) mod conns;
pub(crate) mod exchange;
pub(crate) mod nginx;
pub(crate) mod offsets;
pub(crate) mod probe;
pub(crate) mod python;
pub(crate) mod tls;
pub(crate) mod uprobes;
mod x86;

use std::{fs::File, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, SockOps, TracePoint, links::CgroupAttachMode},
};
use hopwatch_common::{
    KernelOffsets, KernelSettings, OFFSETS_GLOBAL, SETTINGS_GLOBAL, SYSCALLS_GLOBAL,
    SyscallNumbers, TRACE_COROUTINES,
    maps::{COUNTERS, DROP_IGNORE, EVENTS, SYSCALL_TAILS},
};

use crate::{
    drops::{DropReasonError, DropReasons},
    metrics::capability::Capability,
};

/// The kernel object built by `build.rs`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hopwatch"));

/// TCP lifecycle hooks (`tp_btf`), in attach order.
const TCP_TRACEPOINTS: [&str; 4] =
    ["inet_sock_set_state", "tcp_retransmit_skb", "tcp_send_reset", "tcp_receive_reset"];
const DROP_TRACEPOINT: &str = "kfree_skb";
/// The `kfree_skb` program for kernels whose tracepoint has no `reason` (before 5.17).
const DROP_NO_REASON_PROGRAM: &str = "kfree_skb_no_reason";
/// Socket data hooks (tp_btf) for L7 capture (the tracepoints are in 6.3+).
const DATA_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];
/// The syscall capture path's programs (for kernels without [`DATA_TRACEPOINTS`]), each attached
/// to the `syscalls:sys_enter_*`/`sys_exit_*` tracepoint of every syscall in [`DATA_SYSCALLS`].
const SYSCALL_ENTER_PROGRAM: &str = "sys_enter_socket_io";
const SYSCALL_EXIT_PROGRAM: &str = "sys_exit_socket_io";
/// Protocol detection of the syscall path, a tail call of [`SYSCALL_EXIT_PROGRAM`].
const SYSCALL_DETECT_PROGRAM: &str = "syscall_detect";
const DATA_SYSCALLS: [&str; 10] = [
    "read", "write", "readv", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
    "recvmmsg",
];
const SOCK_OPS_PROGRAM: &str = "hopwatch_sockops";

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("reading kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    DropReasons(#[from] DropReasonError),
    #[error("loading the kernel object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("program {program} is missing from the kernel object (build mismatch)")]
    NoProgram { program: &'static str },
    #[error("map {map} is missing from the kernel object (build mismatch)")]
    NoMap { map: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "the kernel verifier rejected {program}: {reason}; fix: check `hopwatch agent --probe` \
         for missing BPF features (HOPWATCH_LOG=debug prints the whole verifier log)"
    )]
    Verify { program: &'static str, reason: String },
    #[error("cannot load {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach {hook}: {source}")]
    Attach {
        hook: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to load and how to set it up.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub settings: KernelSettings,
    /// Drop reasons not to report, by name.
    pub drop_ignore: Vec<String>,
    /// Whether `drop_ignore` came from the user (unknown names are then an error).
    pub drop_ignore_strict: bool,
    /// Attach `skb:kfree_skb`.
    pub drops: bool,
    /// cgroup v2 directory for `sock_ops` (`None`: no TCP counters).
    pub cgroup2: Option<PathBuf>,
    /// Override of the events ring buffer size in bytes (power of two, page multiple).
    pub ringbuf_bytes: Option<u32>,
    /// Which uprobe sets to attach.
    pub uprobes: UprobeSets,
    /// Which `kfree_skb` program to use.
    pub drop_hook: DropHook,
    /// Which hooks capture application payload.
    pub l7_hook: L7Hook,
    /// Whether the kernel's exchange engine measures promoted connections (`false`:
    /// `--no-kernel-exchanges`, every exchange measured in userspace); for the capability line.
    pub kernel_exchanges: bool,
}

/// The uprobe sets asked for (each needs `settings.capture_bytes > 0`, but for `idle_tls`).
#[derive(Debug, Clone, Copy)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line switches")]
pub(crate) struct UprobeSets {
    /// OpenSSL's, for TLS plaintext.
    pub tls: bool,
    /// OpenSSL's attached with `settings.capture_bytes == 0`, where they return at once: what
    /// the probes alone cost (the benchmark's floor for TLS capture).
    pub idle_tls: bool,
    /// Where OpenSSL's are attached.
    pub tls_probes: TlsProbes,
    /// nginx's, linking upstream requests to their downstream requests (needs
    /// `settings.trace_threads` too).
    pub nginx: bool,
    /// CPython's, naming the asyncio task behind each call (needs `TRACE_COROUTINES` in
    /// `settings.trace_threads`).
    pub python: bool,
}

/// The hooks application payload is captured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum L7Hook {
    /// The socket layer's tracepoints where the kernel has them (6.3+), syscall tracepoints
    /// otherwise.
    Auto,
    /// `sock:sock_send_length`/`sock_recv_length`: only socket calls run a program, and the
    /// kernel can measure exchanges itself.
    Socket,
    /// `syscalls:sys_enter_*`/`sys_exit_*` of the read/write/send/recv families: every kernel;
    /// exchanges are measured in userspace.
    Syscalls,
}

/// Where the OpenSSL uprobes go (see `loader/tls.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TlsProbes {
    /// The internal read and write functions where the exported ones are recognised as
    /// wrappers around them, the exported functions otherwise.
    Auto,
    /// The exported functions only.
    Exported,
}

/// The `kfree_skb` program: with the kernel's drop reason (5.17+), or without (older kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DropHook {
    /// With reasons where this kernel's BTF has `enum skb_drop_reason`, without otherwise.
    Auto,
    Reasons,
    /// Without reasons even where the kernel has them (how kernels before 5.17 are served).
    NoReasons,
}

/// The loaded and attached programs, and the maps userspace reads.
pub(crate) struct Loaded {
    /// Owns every program and link; dropping it detaches them all.
    pub ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    pub reasons: DropReasons,
    /// One line per attached hook, for the start-up report.
    pub hooks: Vec<String>,
    /// The uprobe sets enabled (TLS, nginx): rescan them periodically for new files.
    pub uprobes: Vec<uprobes::FileProbes>,
    /// Each kernel-side capability asked for: the hooks it runs through, or why it does not.
    pub capabilities: Vec<Capability>,
    /// The hooks L7 capture runs on ([`L7Hook::Socket`] or [`L7Hook::Syscalls`]), if it runs.
    pub l7_hook: Option<L7Hook>,
}

/// Loads and attaches everything. The TCP hooks are required (an error stops the agent); drops,
/// TCP counters, L7 capture and TLS are optional: one that cannot load or attach is reported in
/// [`Loaded::capabilities`] and the rest runs without it.
pub(crate) fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    raise_memlock_limit();
    let our_btf = btf::Btf::from_file(btf::Btf::VMLINUX)?;
    let offsets: KernelOffsets = offsets::compute(&our_btf)?;
    // `enum skb_drop_reason` came with the tracepoint's `reason` argument (5.17).
    let kernel_has_reasons = our_btf.has_name("skb_drop_reason");
    let with_reasons = match opts.drop_hook {
        DropHook::Auto => kernel_has_reasons,
        DropHook::Reasons => true,
        DropHook::NoReasons => false,
    };
    let reasons =
        if with_reasons { DropReasons::from_btf(&our_btf)? } else { DropReasons::reasonless() };
    let ignore = reasons.ignore_bitmap(&opts.drop_ignore, opts.drop_ignore_strict)?;

    let syscalls = syscall_numbers();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(OFFSETS_GLOBAL, &offsets, true)
        .override_global(SETTINGS_GLOBAL, &opts.settings, true)
        .override_global(SYSCALLS_GLOBAL, &syscalls, true);
    if let Some(bytes) = opts.ringbuf_bytes {
        loader.map_max_entries(EVENTS, bytes);
    }
    let mut ebpf = loader.load(KERNEL_OBJECT).map_err(LoadError::Object)?;
    // Before anything attaches: `kfree_skb` runs from the moment it is attached, and the other
    // programs take a while to verify; until the bitmap is written every reason is reported.
    write_drop_ignore(&mut ebpf, &ignore)?;

    let aya_btf = aya::Btf::from_sys_fs().map_err(|e| LoadError::Object(e.into()))?;
    let mut hooks = Vec::new();
    let mut capabilities = Vec::new();
    let tcp: Vec<(&'static str, &'static str)> = TCP_TRACEPOINTS.iter().map(|t| (*t, *t)).collect();
    hooks.extend(attach_tracepoints(&mut ebpf, &aya_btf, &tcp)?);
    capabilities.push(Capability::up("tcp", hooks.join(", ")));

    if opts.drops {
        let program = if with_reasons { DROP_TRACEPOINT } else { DROP_NO_REASON_PROGRAM };
        match attach_tracepoints(&mut ebpf, &aya_btf, &[(program, DROP_TRACEPOINT)]) {
            Ok(h) => {
                let how = if with_reasons {
                    "with the kernel's drop reasons"
                } else {
                    "without drop reasons (kfree_skb has them from 5.17): reason unknown on this \
                     kernel"
                };
                capabilities.push(Capability::up("drops", format!("{} {how}", h.join(", "))));
                hooks.extend(h);
            }
            Err(e) => capabilities.push(Capability::down("drops", e.to_string())),
        }
    }

    let l7_hook = if opts.settings.capture_bytes > 0 {
        let socket_layer = match opts.l7_hook {
            L7Hook::Auto => our_btf.has_name("btf_trace_sock_send_length"),
            L7Hook::Socket => true,
            L7Hook::Syscalls => false,
        };
        let attached = if socket_layer {
            let data: Vec<_> = DATA_TRACEPOINTS.iter().map(|t| (*t, *t)).collect();
            attach_tracepoints(&mut ebpf, &aya_btf, &data).map(|h| (L7Hook::Socket, h))
        } else {
            attach_syscall_tracepoints(&mut ebpf).map(|h| (L7Hook::Syscalls, h))
        };
        match attached {
            Ok((hook, h)) => {
                let how = l7_how(hook, opts.kernel_exchanges);
                capabilities
                    .push(Capability::up("l7_capture", format!("{} ({how})", h.join(", "))));
                hooks.extend(h);
                Some(hook)
            }
            Err(e) => {
                capabilities.push(Capability::down(
                    "l7_capture",
                    format!("{e}: no application exchanges on this kernel"),
                ));
                None
            }
        }
    } else {
        None
    };

    let counters = tcp_counters(&mut ebpf, opts.cgroup2.as_deref());
    if counters.up {
        hooks.push(counters.detail.clone());
    }
    capabilities.push(counters);

    let uprobes = attach_uprobes(&mut ebpf, opts, &mut hooks, &mut capabilities);

    let events = RingBuf::try_from(ebpf.take_map(EVENTS).ok_or(LoadError::NoMap { map: EVENTS })?)
        .map_err(|source| LoadError::Map { map: EVENTS, source })?;
    let counters =
        PerCpuArray::try_from(ebpf.take_map(COUNTERS).ok_or(LoadError::NoMap { map: COUNTERS })?)
            .map_err(|source| LoadError::Map { map: COUNTERS, source })?;
    Ok(Loaded { ebpf, events, counters, reasons, hooks, uprobes, capabilities, l7_hook })
}

/// The uprobe sets asked for, each attached to every file found now.
fn attach_uprobes(
    ebpf: &mut Ebpf,
    opts: &LoadOptions,
    hooks: &mut Vec<String>,
    capabilities: &mut Vec<Capability>,
) -> Vec<uprobes::FileProbes> {
    type Load = fn(&mut Ebpf) -> Result<uprobes::FileProbes, LoadError>;
    let idle_tls = opts.uprobes.idle_tls && opts.settings.capture_bytes == 0;
    if opts.settings.capture_bytes == 0 && !idle_tls {
        return Vec::new();
    }
    let sets: [(bool, &'static str, Load, &str); 3] = [
        (
            opts.uprobes.tls || idle_tls,
            "tls",
            match opts.uprobes.tls_probes {
                TlsProbes::Auto => tls::load,
                TlsProbes::Exported => tls::load_exported,
            },
            "no OpenSSL library (libssl) found in running processes or the library paths",
        ),
        (
            opts.uprobes.nginx && opts.settings.trace_threads != 0,
            "nginx",
            nginx::load,
            "no nginx binary found in running processes or the usual paths",
        ),
        (
            opts.uprobes.python && opts.settings.trace_threads & TRACE_COROUTINES != 0,
            "python",
            python::load,
            "no Python 3 interpreter found in running processes",
        ),
    ];
    sets.into_iter()
        .filter(|(wanted, ..)| *wanted)
        .filter_map(|(_, name, load, none)| {
            attach_file_probes(ebpf, name, load, none, hooks, capabilities)
        })
        .collect()
}

/// How the L7 capability runs, for its line: the hook, and where exchanges are measured.
fn l7_how(hook: L7Hook, kernel_exchanges: bool) -> &'static str {
    match (hook, kernel_exchanges) {
        (L7Hook::Socket, true) => "socket layer; HTTP/1 exchanges measured in the kernel",
        (L7Hook::Socket, false) => {
            "socket layer; every exchange measured in userspace (--no-kernel-exchanges)"
        }
        (_, true) => {
            "syscall tracepoints (no sock:sock_send_length on this kernel, 6.3+); HTTP/1 \
             exchanges over TLS measured in the kernel, the others in userspace"
        }
        (_, false) => {
            "syscall tracepoints (no sock:sock_send_length on this kernel, 6.3+); every exchange \
             measured in userspace (--no-kernel-exchanges)"
        }
    }
}

/// One set of uprobes (capability `name`) attached to every file found now (rescanned later by
/// the agent); `none` says why nothing was found.
fn attach_file_probes(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: fn(&mut Ebpf) -> Result<uprobes::FileProbes, LoadError>,
    none: &str,
    hooks: &mut Vec<String>,
    capabilities: &mut Vec<Capability>,
) -> Option<uprobes::FileProbes> {
    let mut probes = match load(ebpf) {
        Ok(p) => p,
        Err(e) => {
            capabilities.push(Capability::down(name, e.to_string()));
            return None;
        }
    };
    let (attached, failed) = probes.scan(ebpf);
    for (file, err) in &failed {
        tracing::warn!(probes = name, file = %file.display(), error = %err, "cannot attach uprobes");
    }
    let files: Vec<String> = attached
        .iter()
        .map(|(file, functions)| format!("{functions} on {}", file.display()))
        .collect();
    hooks.extend(files.iter().cloned());
    capabilities.push(if files.is_empty() {
        Capability::down(
            name,
            match failed.first() {
                Some((file, err)) => format!("cannot attach to {}: {err}", file.display()),
                None => format!("{none}; rescanned every 10 s"),
            },
        )
    } else {
        Capability::up(name, files.join(", "))
    });
    Some(probes)
}

/// Loads and attaches `(program, tracepoint)` pairs as BTF tracepoints, all or none: when one
/// fails, those of the group already loaded are unloaded (their links detached) again.
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    group: &[(&'static str, &'static str)],
) -> Result<Vec<String>, LoadError> {
    for &(program, tracepoint) in group {
        if let Err(e) = attach_tracepoint(ebpf, btf, program, tracepoint) {
            for (program, _) in group {
                if let Some(prog) = ebpf.program_mut(program)
                    && let Ok(prog) = <&mut BtfTracePoint>::try_from(prog)
                {
                    // Programs not loaded (the one that failed, those after it) refuse; nothing
                    // to undo there.
                    let _ = prog.unload();
                }
            }
            return Err(e);
        }
    }
    Ok(group.iter().map(|(_, tp)| format!("tp_btf/{tp}")).collect())
}

/// The syscall capture path: its two programs on the enter and exit tracepoints of every syscall
/// in [`DATA_SYSCALLS`], all or none.
fn attach_syscall_tracepoints(ebpf: &mut Ebpf) -> Result<Vec<String>, LoadError> {
    let mut attach = |program: &'static str, phase: &str| -> Result<(), LoadError> {
        let prog: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or(LoadError::NoProgram { program })?
            .try_into()
            .map_err(|source| LoadError::Program { program, source })?;
        prog.load().map_err(|e| rejected(program, e))?;
        for syscall in DATA_SYSCALLS {
            let name = format!("sys_{phase}_{syscall}");
            prog.attach("syscalls", &name)
                .map_err(|source| LoadError::Attach { hook: format!("syscalls/{name}"), source })?;
        }
        Ok(())
    };
    let attached = attach(SYSCALL_ENTER_PROGRAM, "enter")
        .and_then(|()| attach(SYSCALL_EXIT_PROGRAM, "exit"))
        .and_then(|()| syscall_tail_calls(ebpf));
    if let Err(e) = attached {
        for program in [SYSCALL_ENTER_PROGRAM, SYSCALL_EXIT_PROGRAM, SYSCALL_DETECT_PROGRAM] {
            if let Some(prog) = ebpf.program_mut(program)
                && let Ok(prog) = <&mut TracePoint>::try_from(prog)
            {
                // Unloading detaches its links; one never loaded refuses, with nothing to undo.
                let _ = prog.unload();
            }
        }
        return Err(e);
    }
    Ok(vec![format!("tracepoint/syscalls/sys_{{enter,exit}}_{{{}}}", DATA_SYSCALLS.join(","))])
}

/// Fills the syscall path's tail-call slots: the exit program (which captures one message of a
/// `sendmmsg`/`recvmmsg` per run) and protocol detection (loaded here, never attached).
fn syscall_tail_calls(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let program = SYSCALL_DETECT_PROGRAM;
    let detect: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::NoProgram { program })?
        .try_into()
        .map_err(|source| LoadError::Program { program, source })?;
    detect.load().map_err(|e| rejected(program, e))?;
    for (slot, program) in [(0, SYSCALL_EXIT_PROGRAM), (1, SYSCALL_DETECT_PROGRAM)] {
        set_tail_call(ebpf, SYSCALL_TAILS, slot, program)?;
    }
    Ok(())
}

/// Puts the loaded `program` in slot `slot` of the program array `map`.
pub(crate) fn set_tail_call(
    ebpf: &mut Ebpf,
    map: &'static str,
    slot: u32,
    program: &'static str,
) -> Result<(), LoadError> {
    let fd = ebpf
        .program(program)
        .ok_or(LoadError::NoProgram { program })?
        .fd()
        .map_err(|source| LoadError::Program { program, source })?
        .try_clone()
        .map_err(|e| LoadError::Program { program, source: ProgramError::IOError(e) })?;
    let mut tails: ProgramArray<_> = ebpf
        .map_mut(map)
        .ok_or(LoadError::NoMap { map })?
        .try_into()
        .map_err(|source| LoadError::Map { map, source })?;
    tails.set(slot, &fd, 0).map_err(|source| LoadError::Map { map, source })
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    program: &'static str,
    tracepoint: &'static str,
) -> Result<(), LoadError> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::NoProgram { program })?
        .try_into()
        .map_err(|source| LoadError::Program { program, source })?;
    prog.load(tracepoint, btf).map_err(|e| rejected(program, e))?;
    prog.attach()
        .map_err(|source| LoadError::Attach { hook: format!("tp_btf/{tracepoint}"), source })?;
    Ok(())
}

/// `sock_ops` on the cgroup v2 hierarchy, for bytes, RTT and retransmits.
fn tcp_counters(ebpf: &mut Ebpf, cgroup2: Option<&std::path::Path>) -> Capability {
    let Some(cgroup) = cgroup2 else {
        return Capability::down(
            "tcp_counters",
            "no cgroup v2 mount for sock_ops: connections carry no bytes, RTT or retransmits \
             (fix: mount -t cgroup2 none /sys/fs/cgroup/unified)",
        );
    };
    match attach_sock_ops(ebpf, cgroup) {
        Ok(hook) => Capability::up("tcp_counters", hook),
        Err(e) => Capability::down(
            "tcp_counters",
            format!("{e}; connections carry no bytes, RTT or retransmits"),
        ),
    }
}

/// Attaches `sock_ops` to the cgroup v2 hierarchy at `cgroup`; returns the hook's description.
fn attach_sock_ops(ebpf: &mut Ebpf, cgroup: &std::path::Path) -> Result<String, LoadError> {
    let file = File::open(cgroup)
        .map_err(|source| LoadError::Cgroup { path: cgroup.display().to_string(), source })?;
    let prog: &mut SockOps = ebpf
        .program_mut(SOCK_OPS_PROGRAM)
        .ok_or(LoadError::NoProgram { program: SOCK_OPS_PROGRAM })?
        .try_into()
        .map_err(|source| LoadError::Program { program: SOCK_OPS_PROGRAM, source })?;
    prog.load().map_err(|e| rejected(SOCK_OPS_PROGRAM, e))?;
    // A cgroup BPF link is always attached in multi mode (coexisting with Cilium and other
    // agents on the root cgroup); LINK_CREATE refuses explicit flags, hence `Single` (0).
    let hook = format!("sock_ops on {}", cgroup.display());
    prog.attach(file, CgroupAttachMode::Single)
        .map_err(|source| LoadError::Attach { hook: hook.clone(), source })?;
    Ok(hook)
}

/// Fills the kernel's drop-reason ignore bitmap.
fn write_drop_ignore(ebpf: &mut Ebpf, words: &[u32]) -> Result<(), LoadError> {
    let mut drop_ignore: Array<_, u32> = ebpf
        .map_mut(DROP_IGNORE)
        .ok_or(LoadError::NoMap { map: DROP_IGNORE })?
        .try_into()
        .map_err(|source| LoadError::Map { map: DROP_IGNORE, source })?;
    for (i, word) in (0u32..).zip(words) {
        drop_ignore
            .set(i, *word, 0)
            .map_err(|source| LoadError::Map { map: DROP_IGNORE, source })?;
    }
    Ok(())
}

/// Run counts and run time of hopwatch's loaded programs (`(name, runs, total time)`), as the
/// kernel counts them while BPF run-time statistics are enabled.
pub(crate) fn program_stats(ebpf: &Ebpf) -> Vec<(String, u64, std::time::Duration)> {
    ebpf.programs()
        .filter_map(|(name, prog)| {
            let info = prog.info().ok()?;
            Some((name.to_owned(), info.run_count(), info.run_time()))
        })
        .filter(|(_, runs, _)| *runs > 0)
        .collect()
}

/// This architecture's syscall numbers, from libc.
fn syscall_numbers() -> SyscallNumbers {
    let n = |nr: libc::c_long| u32::try_from(nr).unwrap_or(u32::MAX);
    SyscallNumbers {
        read: n(libc::SYS_read),
        write: n(libc::SYS_write),
        readv: n(libc::SYS_readv),
        writev: n(libc::SYS_writev),
        sendto: n(libc::SYS_sendto),
        recvfrom: n(libc::SYS_recvfrom),
        sendmsg: n(libc::SYS_sendmsg),
        recvmsg: n(libc::SYS_recvmsg),
        sendmmsg: n(libc::SYS_sendmmsg),
        recvmmsg: n(libc::SYS_recvmmsg),
    }
}

/// A load failure as one line: for verifier rejections, the verifier's own verdict (the last line
/// of its log that is not statistics); the whole log goes to the debug log.
pub(crate) fn rejected(program: &'static str, e: ProgramError) -> LoadError {
    match &e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            tracing::debug!(program, %log, "verifier log");
            LoadError::Verify { program, reason: format!("{io_error}: {}", verifier_verdict(&log)) }
        }
        _ => LoadError::Program { program, source: e },
    }
}

fn verifier_verdict(log: &str) -> &str {
    const STATS: [&str; 4] = ["processed ", "verification time", "stack depth", "max_states"];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .unwrap_or("no verifier log")
}

/// Kernels before 5.11 charge BPF maps against `RLIMIT_MEMLOCK`.
fn raise_memlock_limit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::verifier_verdict;

    #[test]
    fn the_verdict_is_the_last_line_that_is_not_statistics() {
        let log = "0: R1=ctx() R10=fp0\n142: (79) r1 = *(u64 *)(r6 +56)\n\
                   invalid bpf_context access off=56 size=8\nverification time 8299 usec\n\
                   stack depth 24+0\nprocessed 1069 insns (limit 1000000) max_states_per_insn 4\n";
        assert_eq!(verifier_verdict(log), "invalid bpf_context access off=56 size=8");
        assert_eq!(verifier_verdict(""), "no verifier log");
    }
}
