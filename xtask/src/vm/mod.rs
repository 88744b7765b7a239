//! `cargo xtask vm-test`: the release agent on Debian's own kernel (Debian 12's 6.1 by default),
//! booted under qemu, against traffic with a known truth.
//!
//! The kernel package is fetched with `apt-get download` and unpacked under `target/vm/` (the
//! host's own kernel and boot set-up are left alone). The guest boots a minimal initramfs written
//! here (static busybox, the agent, the few kernel modules the test needs), which mounts the
//! host's root file system read-only over 9p and runs the test inside it, with tmpfs where the
//! servers write: so the guest runs the host's real nginx, PostgreSQL, Redis, dnsmasq, curl,
//! psql, redis-cli and dig, as installed by `cargo xtask test`. KVM did not boot guests on the
//! machines this runs on, so qemu uses TCG. Inside, a veth pair joins the root namespace (the
//! clients) to a peer namespace (the servers); `tc netem` delays the client's packets by
//! [`DELAY_MS`]. The guest prints what the agent printed (stderr, stdout, a `/metrics` scrape)
//! and the BPF program counts between markers on the serial console, and the checks run here on
//! what a user would read. The same guest measures the agent's cost on that kernel
//! ([`bench`]: wrk against nginx, with and without the agent, rounds alternated).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use checks::{section, verify};
use guest::{Mode, write_initramfs};

use crate::{apt_install, check, output, say, workspace_root};

mod checks;
mod guest;

/// Debian packages the VM test needs on the host (the guest runs them from the host's root):
/// qemu, the guest's tools, and the servers and clients of the traffic.
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "iproute2",
    "nftables",
    "bpftool",
    "kmod",
    "util-linux",
    "nginx",
    "postgresql",
    "redis-server",
    "dnsmasq-base",
    "curl",
    "bind9-dnsutils",
    "openssl",
    "wrk",
];
/// One-way delay netem adds to the client's packets: a connect takes at least this long.
const DELAY_MS: f64 = 40.0;
/// Bytes the client downloads per connection.
const FILE_BYTES: usize = 200_000;
/// Longest the guest may run before it is stopped and the test fails (it takes about 20 s under
/// TCG on a 2-core machine; the bound keeps a hung guest from eating CI's time).
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Modules loaded before the agent starts (the host's root over virtio 9p, veth, netem), and
/// after it (nftables for the drop: loading it earlier would give the agent conntrack's netlink
/// family, and the point of the first start is to run on a kernel where it is missing). Modules
/// this kernel has built in are skipped.
const EARLY_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "veth", "sch_netem"];
/// (nf_tables needs libcrc32c, whose crc32c implementation is otherwise loaded on demand.)
const LATE_MODULES: &[&str] = &["crc32c_generic", "nf_tables"];
/// The host's root as the guest sees it (a 9p share).
const HOST_TAG: &str = "hostroot";

pub(crate) struct VmOptions {
    /// Debian kernel ABI, e.g. `6.1.0-47` [default: what `linux-image-amd64` depends on].
    pub kernel: Option<String>,
}

pub(crate) fn run(opts: &VmOptions) -> Result<()> {
    let started = Instant::now();
    let (abi, log, console) = guest(opts.kernel.as_deref(), Mode::Test)?;
    let verdict = verify(&log);
    say(&format!("vm-test on {abi}: {:.0} s in all", started.elapsed().as_secs_f64()));
    verdict.with_context(|| format!("vm-test on {abi}; the guest's console: {}", console.display()))
}

/// The agent's cost on Debian's kernel: requests/s of wrk against nginx inside the guest, without
/// the agent and with it (full L7 capture on the path that kernel has), per round.
pub(crate) struct VmBench {
    pub kernel: String,
    /// `(without, with)` requests/s per round.
    pub rounds: Vec<(f64, f64)>,
    /// The agent's CPU seconds per request, per round.
    pub cpu_per_request: Vec<f64>,
    /// The agent's start-up line naming the L7 capture path.
    pub l7_line: String,
}

pub(crate) fn bench(kernel: Option<&str>, rounds: u32, seconds: u32) -> Result<VmBench> {
    let (abi, log, console) = guest(kernel, Mode::Bench { rounds, seconds })?;
    let log = log.replace("\r\n", "\n");
    let table = section(&log, "bench");
    let mut rps: BTreeMap<(u32, String), f64> = BTreeMap::new();
    let mut cpu = Vec::new();
    for l in table.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["round", r, mode, v] => {
                let (Ok(r), Ok(v)) = (r.parse(), v.parse()) else { continue };
                rps.insert((r, (*mode).to_owned()), v);
            }
            ["cpu", r, ticks, hz] => {
                let (Ok(r), Ok(t), Ok(hz)) =
                    (r.parse::<u32>(), ticks.parse::<f64>(), hz.parse::<f64>())
                else {
                    continue;
                };
                cpu.push((r, t / hz));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut cpu_per_request = Vec::new();
    for r in 1..=rounds {
        let (Some(none), Some(l7)) =
            (rps.get(&(r, "none".to_owned())), rps.get(&(r, "l7".to_owned())))
        else {
            bail!(
                "round {r} of the VM bench has no wrk figure (console: {}):\n{table}",
                console.display()
            );
        };
        out.push((*none, *l7));
        // Each round starts a new agent: its CPU time is that round's.
        if let Some((_, secs)) = cpu.iter().find(|(cr, _)| *cr == r) {
            cpu_per_request.push(secs / (l7 * f64::from(seconds)));
        }
    }
    let l7_line = section(&log, "agent.err")
        .lines()
        .find(|l| l.contains("l7_capture:"))
        .unwrap_or("no l7_capture line")
        .to_owned();
    Ok(VmBench { kernel: abi, rounds: out, cpu_per_request, l7_line })
}

/// Boots Debian's kernel `kernel` with the guest for `mode`; returns the kernel ABI, the serial
/// console's text and where it was saved.
fn guest(kernel: Option<&str>, mode: Mode) -> Result<(String, String, PathBuf)> {
    apt_install(VM_PACKAGES)?;
    let abi = match kernel {
        Some(k) => k.trim_end_matches("-amd64").to_owned(),
        None => default_kernel()?,
    };
    let dir = target_dir().join("vm");
    let kernel = unpack_kernel(&dir, &abi)?;
    let agent = target_dir().join("release/hopwatch");
    if !agent.exists() {
        bail!("{} is missing (cargo xtask build --release)", agent.display());
    }
    let initramfs = dir.join(format!("initramfs-{abi}.cpio"));
    say(&format!("writing the guest's initramfs {}", initramfs.display()));
    write_initramfs(&initramfs, &kernel, &agent, mode)?;
    let console = dir.join(format!("console-{abi}.log"));
    say(&format!(
        "booting Debian's {abi}-amd64 under qemu (TCG); console in {}",
        console.display()
    ));
    let booted = Instant::now();
    let timeout = match mode {
        Mode::Test => GUEST_TIMEOUT,
        Mode::Bench { rounds, seconds } => {
            GUEST_TIMEOUT + Duration::from_secs(u64::from(rounds * (2 * seconds + 30)))
        }
    };
    boot(&kernel.vmlinuz, &initramfs, &console, timeout)?;
    say(&format!("the guest ran {:.0} s", booted.elapsed().as_secs_f64()));
    let log = std::fs::read_to_string(&console)
        .with_context(|| format!("reading {}", console.display()))?;
    Ok((abi, log, console))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The kernel `linux-image-amd64` (Debian's default flavour) currently points at.
fn default_kernel() -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("apt-cache depends linux-image-amd64")?;
    deps.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .and_then(|p| p.strip_suffix("-amd64"))
        .map(str::to_owned)
        .context("linux-image-amd64 names no kernel package (apt-get update?)")
}

struct Kernel {
    abi: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<abi>-amd64` of the unpacked package.
    modules: PathBuf,
}

/// Downloads `linux-image-<abi>-amd64` and unpacks it under `dir` (once).
fn unpack_kernel(dir: &Path, abi: &str) -> Result<Kernel> {
    let package = format!("linux-image-{abi}-amd64");
    let root = dir.join(&package);
    let release = format!("{abi}-amd64");
    let kernel = Kernel {
        abi: release.clone(),
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        modules: root.join(format!("lib/modules/{release}")),
    };
    if kernel.modules.join("modules.dep").exists() && kernel.vmlinuz.exists() {
        return Ok(kernel);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    say(&format!("downloading Debian's {package} (apt-get download) into {}", dir.display()));
    let download =
        || Command::new("apt-get").args(["download", "-q", &package]).current_dir(dir).status();
    if !download().is_ok_and(|s| s.success()) {
        say("apt-get update (package lists)");
        check(Command::new("apt-get").args(["update", "-q"]))?;
        check(Command::new("apt-get").args(["download", "-q", &package]).current_dir(dir))?;
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {package} .deb in {}", dir.display()))?;
    check(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    // The package ships no modules.dep (its postinst makes it): the guest's insmod order comes
    // from it.
    check(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    Ok(kernel)
}

/// `modules` and their dependencies as paths under the module directory, dependencies first.
fn module_order(kernel: &Kernel, modules: &[&str]) -> Result<Vec<String>> {
    let dep = std::fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let builtin =
        std::fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |name: &str| {
        builtin.lines().any(|l| {
            Path::new(l).file_stem().and_then(|f| f.to_str()).is_some_and(|f| {
                f.trim_end_matches(".ko").replace('-', "_") == name.replace('-', "_")
            })
        })
    };
    let deps: BTreeMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit<'a>(
        m: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, seen, order);
        }
        order.push(m.to_owned());
    }
    for name in modules.iter().filter(|m| !is_builtin(m)) {
        let path = deps
            .keys()
            .find(|p| {
                Path::new(p).file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                    f.strip_suffix(".ko").or_else(|| f.split_once(".ko.").map(|(n, _)| n))
                        == Some(*name)
                })
            })
            .with_context(|| format!("module {name} is not in {}", kernel.abi))?;
        visit(path, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// Boots the guest and waits until it powers off (or [`GUEST_TIMEOUT`]).
fn boot(vmlinuz: &Path, initramfs: &Path, console: &Path, timeout: Duration) -> Result<()> {
    let _ = std::fs::remove_file(console);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2G", "-smp", "2"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none"])
        .arg("-virtfs")
        .arg(format!("local,path=/,mount_tag={HOST_TAG},security_model=passthrough,readonly=on,multidevs=remap"))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let start = Instant::now();
    loop {
        if let Some(status) = qemu.try_wait()? {
            if !status.success() {
                bail!("qemu exited with {status}");
            }
            return Ok(());
        }
        if start.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!("the guest did not finish within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
