//! What this kernel and this process allow, checked before anything is loaded.
//!
//! One line per capability; a missing requirement carries the fix. Hooks are then picked from
//! the result: kprobes and fentry are optional accelerators hopwatch never depends on.

use std::{fmt, fs, path::PathBuf};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

use super::{btf::Btf, offsets};
use crate::commands::error_chain;

/// Where tracefs lives on current kernels.
pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    /// Not there, and hopwatch cannot run without it.
    Missing,
    /// Not there; hopwatch runs without it (with the stated loss, if any).
    Unavailable,
}

#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

/// The probe's findings.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub kernel: String,
    pub checks: Vec<Check>,
    /// cgroup v2 mount point, for `sock_ops`.
    pub cgroup2: Option<PathBuf>,
}

impl Probe {
    /// Runs every check. With `mount_tracefs`, mounts tracefs if it is missing (as node agents
    /// do); `--probe` only looks.
    #[must_use]
    pub(crate) fn run(mount_tracefs: bool) -> Self {
        let mut checks = Vec::new();
        checks.push(privileges());
        checks.push(btf());
        checks.push(tracefs(mount_tracefs));
        let cgroup2 = cgroup2_mount();
        checks.push(Check {
            name: "cgroup v2",
            status: if cgroup2.is_some() { Status::Ok } else { Status::Unavailable },
            detail: match &cgroup2 {
                Some(p) => p.display().to_string(),
                None => "not mounted: no TCP counters (RTT, bytes, retransmits) from sock_ops; \
                         fix: mount -t cgroup2 none /sys/fs/cgroup/unified"
                    .to_owned(),
            },
        });
        checks.push(map_type("ringbuf", MapType::RingBuf, true, "kernel 5.8+ needed"));
        checks.push(program_type("tracepoint", ProgramType::TracePoint, true, ""));
        checks.push(program_type(
            "tp_btf",
            ProgramType::RawTracePoint,
            true,
            "kernel 5.5+ with BTF needed",
        ));
        checks.push(program_type("sock_ops", ProgramType::SockOps, true, ""));
        checks.push(kprobe());
        checks.push(program_type("fentry", ProgramType::Tracing, false, "optional, not used"));
        let vmlinux = Btf::from_file(Btf::VMLINUX).ok();
        checks.extend(hooks(vmlinux.as_ref()));
        checks.push(conntrack());
        Self { kernel: kernel_release(), checks, cgroup2 }
    }

    /// The first missing requirement, if any.
    #[must_use]
    pub(crate) fn first_missing(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == Status::Missing)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "hopwatch probe: kernel {}", self.kernel)?;
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Missing => "MISSING",
                Status::Unavailable => "unavailable",
            };
            writeln!(f, "  {:<11} {:<11} {}", c.name, status, c.detail)?;
        }
        Ok(())
    }
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// `CAP_NET_ADMIN` (cgroup and tc attach), `CAP_PERFMON` (tracing), `CAP_BPF`. `CAP_SYS_RESOURCE`
/// (`RLIMIT_MEMLOCK`) only matters before 5.11, when maps were charged to it rather than to memcg.
const NEEDED_CAPS: [(u32, &str); 3] = [(12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")];
const CAP_SYS_ADMIN: u32 = 21;

fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn privileges() -> Check {
    let name = "privileges";
    let Some(caps) = effective_caps() else {
        return Check {
            name,
            status: Status::Missing,
            detail: "cannot read CapEff from /proc/self/status".to_owned(),
        };
    };
    // CAP_SYS_ADMIN covers BPF and PERFMON on every kernel.
    let has = |bit: u32| caps & (1 << bit) != 0 || (bit >= 38 && caps & (1 << CAP_SYS_ADMIN) != 0);
    let missing: Vec<&str> =
        NEEDED_CAPS.iter().filter(|(bit, _)| !has(*bit)).map(|(_, n)| *n).collect();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if missing.is_empty() {
        Check {
            name,
            status: Status::Ok,
            detail: if euid == 0 {
                "root".to_owned()
            } else {
                format!("uid {euid} with BPF capabilities")
            },
        }
    } else {
        Check {
            name,
            status: Status::Missing,
            detail: format!(
                "missing {}; fix: run as root (sudo hopwatch agent) or grant \
                 CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
                missing.join(", ")
            ),
        }
    }
}

fn btf() -> Check {
    let name = "btf";
    match Btf::from_file(Btf::VMLINUX).and_then(|b| offsets::compute(&b)) {
        Ok(_) => Check {
            name,
            status: Status::Ok,
            detail: format!("{} (struct offsets resolved)", Btf::VMLINUX),
        },
        Err(e) => Check {
            name,
            status: Status::Missing,
            detail: format!("{e}; fix: a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.5+)"),
        },
    }
}

fn tracefs_mounted() -> bool {
    PathBuf::from(TRACEFS).join("events").is_dir()
}

fn tracefs(mount: bool) -> Check {
    let name = "tracefs";
    if tracefs_mounted() {
        return Check { name, status: Status::Ok, detail: TRACEFS.to_owned() };
    }
    if mount {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, target, fstype) = (c("nodev"), c(TRACEFS), c("tracefs"));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
        };
        if rc == 0 && tracefs_mounted() {
            return Check {
                name,
                status: Status::Ok,
                detail: format!("{TRACEFS} (mounted by hopwatch)"),
            };
        }
        let err = std::io::Error::last_os_error();
        // The current hooks are BTF tracepoints and sock_ops, attached without tracefs; only
        // classic tracepoints would need it.
        return Check {
            name,
            status: Status::Unavailable,
            detail: format!(
                "not mounted and mounting failed ({err}); not needed by the current hooks; \
                 fix: mount -t tracefs nodev {TRACEFS}"
            ),
        };
    }
    Check {
        name,
        status: Status::Unavailable,
        detail: format!("not mounted (hopwatch agent mounts it at {TRACEFS})"),
    }
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid.
#[must_use]
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_ascii_whitespace();
        let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

fn map_type(name: &'static str, ty: MapType, required: bool, need: &str) -> Check {
    let (status, detail) = match is_map_supported(ty) {
        Ok(true) => (Status::Ok, String::new()),
        Ok(false) => (missing_or_unavailable(required), need.to_owned()),
        Err(e) => (missing_or_unavailable(required), error_chain(&e)),
    };
    Check { name, status, detail }
}

fn missing_or_unavailable(required: bool) -> Status {
    if required { Status::Missing } else { Status::Unavailable }
}

fn program_type(name: &'static str, ty: ProgramType, required: bool, note: &str) -> Check {
    let (status, detail) = match is_program_supported(ty) {
        Ok(true) => (Status::Ok, if required { String::new() } else { note.to_owned() }),
        Ok(false) => (missing_or_unavailable(required), note.to_owned()),
        Err(e) => (missing_or_unavailable(required), format!("{}; {note}", error_chain(&e))),
    };
    Check { name, status, detail }
}

/// Which hook each capability would use on this kernel, from the BTF tracepoints it names.
fn hooks(btf: Option<&Btf>) -> Vec<Check> {
    let Some(btf) = btf else { return Vec::new() };
    let tp = |name: &str| btf.has_name(&format!("btf_trace_{name}"));
    let mut checks = Vec::new();
    checks.push(if tp("inet_sock_set_state") {
        Check { name: "tcp", status: Status::Ok, detail: "tp_btf/inet_sock_set_state".to_owned() }
    } else {
        Check {
            name: "tcp",
            status: Status::Missing,
            detail: "no sock:inet_sock_set_state tracepoint in BTF (kernel 4.16+ needed)"
                .to_owned(),
        }
    });
    checks.push(match (tp("kfree_skb"), btf.has_name("skb_drop_reason")) {
        (true, true) => Check {
            name: "drops",
            status: Status::Ok,
            detail: "tp_btf/kfree_skb with the kernel's drop reasons".to_owned(),
        },
        (true, false) => Check {
            name: "drops",
            status: Status::Ok,
            detail: "tp_btf/kfree_skb without drop reasons (5.17+ has them): reason unknown on \
                     this kernel"
                .to_owned(),
        },
        (false, _) => Check {
            name: "drops",
            status: Status::Unavailable,
            detail: "no skb:kfree_skb tracepoint in BTF: no drop flows".to_owned(),
        },
    });
    let syscall_events = PathBuf::from(TRACEFS).join("events/syscalls/sys_exit_recvfrom");
    checks.push(if tp("sock_send_length") && tp("sock_recv_length") {
        Check {
            name: "l7 capture",
            status: Status::Ok,
            detail: "tp_btf/sock_send_length, tp_btf/sock_recv_length (socket layer; HTTP/1 \
                     exchanges measured in the kernel)"
                .to_owned(),
        }
    } else if syscall_events.exists() {
        Check {
            name: "l7 capture",
            status: Status::Ok,
            detail: "tracepoint/syscalls/sys_{enter,exit}_* (no sock:sock_send_length, 6.3+; \
                     HTTP/1 exchanges over TLS measured in the kernel, the others in userspace)"
                .to_owned(),
        }
    } else {
        Check {
            name: "l7 capture",
            status: Status::Unavailable,
            detail: format!(
                "neither sock:sock_send_length (6.3+) nor syscall tracepoints ({} missing: \
                 CONFIG_FTRACE_SYSCALLS off, or tracefs not mounted): no application exchanges",
                syscall_events.display()
            ),
        }
    });
    checks
}

/// conntrack's netlink interface, for Service address translation.
fn conntrack() -> Check {
    const NETLINK_NETFILTER: libc::c_int = 12;
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Check {
            name: "conntrack",
            status: Status::Unavailable,
            detail: format!(
                "netlink: {err}; no Service address translation (fix: modprobe \
                 nf_conntrack_netlink)"
            ),
        };
    }
    // SAFETY: fd is ours and open.
    unsafe { libc::close(fd) };
    Check { name: "conntrack", status: Status::Ok, detail: "netlink".to_owned() }
}

fn kprobe() -> Check {
    // Loading a kprobe program can succeed on kernels without CONFIG_KPROBES; attaching needs the
    // kprobe PMU.
    if !PathBuf::from("/sys/bus/event_source/devices/kprobe").exists() {
        return Check {
            name: "kprobe",
            status: Status::Unavailable,
            detail: "no kprobe PMU (CONFIG_KPROBES off); optional, not used".to_owned(),
        };
    }
    program_type("kprobe", ProgramType::KProbe, false, "optional, not used")
}
