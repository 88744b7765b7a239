//! `cargo xtask vm-test`: the release agent on Debian's own kernel (Debian 12's 6.1 by default),
//! booted under qemu, against traffic with a known truth.
//!
//! The kernel package is fetched with `apt-get download` and unpacked under `target/vm/` (the
//! host's own kernel and boot set-up are left alone); the guest is a minimal initramfs written
//! here: static busybox, the agent, `ip`, `tc`, `nft` and `bpftool` with their shared libraries,
//! and the few kernel modules the test needs. KVM did not boot guests on the machines this runs
//! on, so qemu uses TCG. Inside, a veth pair joins the root namespace to a peer namespace with
//! busybox `httpd`; `tc netem` delays the client's packets by [`DELAY_MS`]. The guest prints what
//! the agent printed (stderr, stdout, a `/metrics` scrape) and the BPF program counts between
//! markers on the serial console, and the checks run here on what a user would read.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, check, output, say, workspace_root};

/// Debian packages the VM test needs on the host.
const VM_PACKAGES: &[&str] =
    &["qemu-system-x86", "busybox-static", "iproute2", "nftables", "bpftool", "kmod"];
/// One-way delay netem adds to the client's packets: a connect takes at least this long.
const DELAY_MS: f64 = 40.0;
/// Bytes the client downloads per connection.
const FILE_BYTES: usize = 200_000;
/// Longest the guest may run before it is stopped and the test fails (it takes about 20 s under
/// TCG on a 2-core machine; the bound keeps a hung guest from eating CI's time).
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Modules loaded before the agent starts (veth, netem), and after it (nftables for the drop:
/// loading it earlier would give the agent conntrack's netlink family, and the point of the
/// first start is to run on a kernel where it is missing).
const EARLY_MODULES: &[&str] = &["veth", "sch_netem"];
/// (nf_tables needs libcrc32c, whose crc32c implementation is otherwise loaded on demand.)
const LATE_MODULES: &[&str] = &["crc32c_generic", "nf_tables"];
/// Binaries copied into the guest with their shared libraries.
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("/usr/sbin/ip", "/usr/local/sbin/ip"),
    ("/usr/sbin/tc", "/usr/local/sbin/tc"),
    ("/usr/sbin/nft", "/usr/local/sbin/nft"),
    ("/usr/sbin/bpftool", "/usr/local/sbin/bpftool"),
];

pub(crate) struct VmOptions {
    /// Debian kernel ABI, e.g. `6.1.0-47` [default: what `linux-image-amd64` depends on].
    pub kernel: Option<String>,
}

pub(crate) fn run(opts: &VmOptions) -> Result<()> {
    let started = Instant::now();
    apt_install(VM_PACKAGES)?;
    let abi = match &opts.kernel {
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
    write_initramfs(&initramfs, &kernel, &agent)?;
    let console = dir.join(format!("console-{abi}.log"));
    say(&format!(
        "booting Debian's {abi}-amd64 under qemu (TCG); console in {}",
        console.display()
    ));
    let booted = Instant::now();
    boot(&kernel.vmlinuz, &initramfs, &console)?;
    let log = std::fs::read_to_string(&console)
        .with_context(|| format!("reading {}", console.display()))?;
    let verdict = verify(&log);
    say(&format!(
        "vm-test on {abi}: guest ran {:.0} s, {:.0} s in all",
        booted.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    verdict.with_context(|| format!("vm-test on {abi}; the guest's console: {}", console.display()))
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
    for name in modules {
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

/// The guest's `/init`: set-up, the agent, the traffic, the report.
fn init_script(early: &[String], late: &[String]) -> String {
    let insmod = |mods: &[String]| {
        mods.iter().fold(String::new(), |mut s, m| {
            let _ = writeln!(s, "insmod /modules/{m} || echo '@@ insmod {m} failed'");
            s
        })
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/local/sbin
# iproute2, tc, nft and bpftool by path: this busybox's shell runs its own applets of the same
# names before anything on PATH.
IP=/usr/local/sbin/ip TC=/usr/local/sbin/tc NFT=/usr/local/sbin/nft BPFTOOL=/usr/local/sbin/bpftool
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mkdir -p /var/run; mount -t tmpfs run /var/run
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
mount -t tracefs nodev /sys/kernel/tracing; mount -t bpf bpf /sys/fs/bpf
# Modules come only from the list below, never on demand.
echo /bin/false > /proc/sys/kernel/modprobe
{early}
progs() {{ $BPFTOOL prog show 2>/dev/null | grep -c '^[0-9]*:'; }}
echo "@@ kernel $(uname -r)"
$IP link set lo up
$IP netns add peer
$IP link add veth0 type veth peer name veth1
$IP link set veth1 netns peer
$IP addr add 10.0.0.1/24 dev veth0; $IP link set veth0 up
$IP -n peer link set lo up; $IP -n peer addr add 10.0.0.2/24 dev veth1; $IP -n peer link set veth1 up
$TC qdisc add dev veth0 root netem delay {delay}ms || echo '@@ netem failed'
$IP netns exec peer httpd -p 10.0.0.2:8080 -h /www
# The neighbour entry first: an ARP exchange would add two delayed packets to the first connect.
ping -c 1 -W 2 10.0.0.2 >/dev/null || echo '@@ ping failed'
echo "@@ progs_before $(progs)"
T0=$(date +%s)
hopwatch agent -o compact --node-name vm --metrics-addr 127.0.0.1:9965 --no-tls >/tmp/agent.out 2>/tmp/agent.err &
AGENT=$!
i=0
while ! grep -q 'hopwatch agent: metrics on' /tmp/agent.err && [ $i -lt 300 ]; do
  kill -0 $AGENT 2>/dev/null || break
  sleep 1; i=$((i+1))
done
echo "@@ agent_start_seconds $(( $(date +%s) - T0 ))"
sleep 2
for n in 1 2 3; do wget -q -O /dev/null http://10.0.0.2:8080/file || echo '@@ wget failed'; done
nc 10.0.0.2 9 </dev/null && echo '@@ port 9 answered'
{late}
$IP netns exec peer $NFT add table inet hw
$IP netns exec peer $NFT add chain inet hw in '{{ type filter hook input priority 0; }}'
$IP netns exec peer $NFT add rule inet hw in tcp dport 7777 drop
timeout 3 nc 10.0.0.2 7777 </dev/null
sleep 3
wget -q -O /tmp/metrics http://127.0.0.1:9965/metrics || echo '@@ scrape failed'
echo "@@ progs_running $(progs)"
kill -9 $AGENT
sleep 2
echo "@@ progs_after_kill $(progs)"
for f in agent.err agent.out metrics; do
  echo "@@begin $f"; cat /tmp/$f; echo "@@end $f"
done
echo "@@ done"
poweroff -f
"#,
        early = insmod(early),
        late = insmod(late),
        delay = DELAY_MS,
    )
}

/// A newc cpio archive, built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = path.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("guest files are small"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("short names"),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, 0o040_755, &[]);
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120_777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Shared libraries `binary` loads (and the dynamic loader), as `ldd` lists them.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(binary))
        .with_context(|| format!("ldd {}", binary.display()))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=> ").map_or(l, |(_, p)| p);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn write_initramfs(path: &Path, kernel: &Kernel, agent: &Path) -> Result<()> {
    let early = module_order(kernel, EARLY_MODULES)?;
    let late = module_order(kernel, LATE_MODULES)?;
    let mut c = Cpio::default();
    for d in [
        "/bin",
        "/sbin",
        "/lib",
        "/lib64",
        "/usr",
        "/usr/lib",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/etc",
        "/var",
        "/run",
        "/www",
        "/modules",
        "/root",
        "/usr/local",
        "/usr/local/sbin",
    ] {
        c.dir(d);
    }
    c.file("/bin/busybox", 0o755, &read(Path::new("/bin/busybox"))?);
    c.file("/init", 0o755, init_script(&early, &late).as_bytes());
    c.file("/bin/hopwatch", 0o755, &read(agent)?);
    c.file("/www/file", 0o644, &vec![b'x'; FILE_BYTES]);
    c.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    c.file("/etc/hostname", 0o644, b"vm\n");
    // Debian's /lib is a symlink to /usr/lib: libraries go where ldd names them, both ways.
    c.symlink("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu");
    c.dir("/lib/x86_64-linux-gnu");
    let mut libs = BTreeSet::new();
    libs.extend(libraries(agent)?);
    for (host, guest) in GUEST_TOOLS {
        c.file(guest, 0o755, &read(Path::new(host))?);
        libs.extend(libraries(Path::new(host))?);
    }
    for lib in libs {
        let real = std::fs::canonicalize(&lib)?;
        let guest = lib.to_string_lossy().replacen("/usr/lib/", "/lib/", 1);
        c.file(&guest, 0o755, &read(&real)?);
    }
    for m in early.iter().chain(&late) {
        let dest = format!("/modules/{m}");
        let mut parent = String::from("/modules");
        for part in Path::new(m).parent().into_iter().flat_map(Path::components) {
            parent.push('/');
            parent.push_str(&part.as_os_str().to_string_lossy());
            c.dir(&parent);
        }
        c.file(&dest, 0o644, &read(&kernel.modules.join(m))?);
    }
    std::fs::write(path, c.finish()).with_context(|| format!("writing {}", path.display()))
}

/// Boots the guest and waits until it powers off (or [`GUEST_TIMEOUT`]).
fn boot(vmlinuz: &Path, initramfs: &Path, console: &Path) -> Result<()> {
    let _ = std::fs::remove_file(console);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2G", "-smp", "2"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none"])
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
        if start.elapsed() > GUEST_TIMEOUT {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!("the guest did not finish within {} s", GUEST_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The text between `@@begin name` and `@@end name` on the console.
fn section<'a>(log: &'a str, name: &str) -> &'a str {
    let begin = format!("@@begin {name}\n");
    let Some(start) = log.find(&begin).map(|i| i + begin.len()) else { return "" };
    let end = log[start..].find(&format!("@@end {name}")).map_or(log.len(), |i| start + i);
    &log[start..end]
}

fn marker(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(&format!("@@ {name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// `40.3ms`, `425µs`, `1.2s` in milliseconds.
fn millis(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(',');
    for (unit, scale) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// `2.2KiB`, `184B` in bytes.
fn bytes(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(',');
    for (unit, scale) in
        [("KiB", 1024.0), ("MiB", 1024.0 * 1024.0), ("GiB", 1024.0_f64.powi(3)), ("B", 1.0)]
    {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// The word after `key` in `line`.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// The checks, each against what a user of the agent would read.
fn verify(log: &str) -> Result<()> {
    let mut failures = Vec::new();
    let mut fail = |msg: String| failures.push(msg);
    // The serial console ends lines with CR LF.
    let log = &log.replace("\r\n", "\n");
    if !log.contains("@@ done") {
        bail!("the guest did not reach the end of its script");
    }
    let err = section(log, "agent.err");
    let out = section(log, "agent.out");
    let metrics = section(log, "metrics");
    for line in log.lines().filter(|l| l.starts_with("@@ ") && l.contains("fail")) {
        fail(format!("guest: {line}"));
    }
    say(&format!(
        "guest {}, agent started in {} s",
        log.lines().find_map(|l| l.strip_prefix("@@ kernel ")).unwrap_or("?"),
        marker(log, "agent_start_seconds").map_or("?".to_owned(), |s| s.to_string())
    ));

    // Start-up: running, with L7 capture and address translation reported unavailable.
    for (what, needle) in [
        (
            "the agent reports L7 capture unavailable, naming the missing tracepoint",
            "hopwatch agent: l7_capture: unavailable",
        ),
        (
            "the agent reports address translation unavailable",
            "hopwatch agent: address_translation: unavailable",
        ),
        (
            "the agent attaches the drop hook with reasons",
            "hopwatch agent: drops: on, via tp_btf/kfree_skb with the kernel's drop reasons",
        ),
        (
            "the agent attaches its TCP hooks",
            "hopwatch agent: tcp: on, via tp_btf/inet_sock_set_state",
        ),
    ] {
        if !err.contains(needle) {
            fail(format!("{what}: no `{needle}` on its stderr"));
        }
    }
    if !err.lines().any(|l| l.contains("l7_capture: unavailable") && l.contains("sock_send_length"))
    {
        fail("the L7 line does not name sock_send_length".to_owned());
    }
    if !metrics.lines().any(|l| {
        l.starts_with("hopwatch_capability_up{capability=\"l7_capture\"") && l.ends_with(" 0")
    }) {
        fail("/metrics has no hopwatch_capability_up{capability=\"l7_capture\"} 0".to_owned());
    }

    // TCP: connect latency against the injected delay, bytes against the file size.
    let connects: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("-> 10.0.0.2:8080 tcp-connect FORWARDED"))
        .filter_map(|l| after(l, "connect").and_then(millis))
        .collect();
    if connects.len() < 3 {
        fail(format!("3 connects to 10.0.0.2:8080 were made, {} reported", connects.len()));
    }
    for ms in &connects {
        // At least the delay of the SYN; the guest is emulated, so generous above.
        if !(DELAY_MS - 1.0..=DELAY_MS * 3.0).contains(ms) {
            fail(format!("connect latency {ms:.1} ms, injected {DELAY_MS} ms"));
        }
    }
    // Bytes: the client's close flow of each download (the one that read the file). Each
    // connection also has the server's close (both ends are on this node).
    let mut received: BTreeMap<&str, f64> = BTreeMap::new();
    let mut zero_closes = 0;
    for l in out.lines().filter(|l| l.contains("-> 10.0.0.2:8080") && l.contains("tcp-close")) {
        let Some(b) = after(l, "received").and_then(bytes) else { continue };
        let port = l.split_whitespace().find(|w| w.starts_with("10.0.0.1:")).unwrap_or("?");
        let best = received.entry(port).or_insert(0.0);
        *best = best.max(b);
        if b == 0.0 {
            zero_closes += 1;
        }
    }
    if received.len() < 3 {
        fail(format!("3 downloads were made, {} have close flows", received.len()));
    }
    #[expect(clippy::cast_precision_loss, reason = "a small size")]
    let want = FILE_BYTES as f64;
    for (port, b) in &received {
        if *b < want || *b > want * 1.05 {
            fail(format!(
                "the download from {port} of {FILE_BYTES} B (plus headers) reported {b:.0} B \
                 received"
            ));
        }
    }
    say(&format!(
        "connect latencies {connects:.1?} ms; received {:.0?} B; {zero_closes} close flows with \
         no counters",
        received.values().collect::<Vec<_>>()
    ));

    // A refused connect, a netfilter drop with its reason.
    if !out
        .lines()
        .any(|l| l.contains("-> 10.0.0.2:9 tcp-connect-failed ERROR") && l.contains("ECONNREFUSED"))
    {
        fail("no ECONNREFUSED flow for the connect to 10.0.0.2:9".to_owned());
    }
    if !out
        .lines()
        .any(|l| l.contains("-> 10.0.0.2:7777 tcp-drop DROPPED NETFILTER_DROP at nft_do_chain+0x"))
    {
        // nf_tables is loaded after the agent started: its functions are named all the same.
        fail(
            "no NETFILTER_DROP flow at nft_do_chain for the SYN to 10.0.0.2:7777 dropped by \
             nftables"
                .to_owned(),
        );
    }

    // SIGKILL leaves nothing behind.
    match (
        marker(log, "progs_before"),
        marker(log, "progs_running"),
        marker(log, "progs_after_kill"),
    ) {
        (Some(before), Some(running), Some(after)) => {
            if running <= before {
                fail(format!(
                    "bpftool saw no programs of the agent ({before} before, {running} running)"
                ));
            }
            if after != before {
                fail(format!(
                    "after SIGKILL {after} BPF programs remain ({before} before the agent)"
                ));
            }
        }
        other => fail(format!("bpftool program counts missing: {other:?}")),
    }
    if failures.is_empty() {
        say("vm-test: every check passed");
        return Ok(());
    }
    let mut msg = String::new();
    for f in &failures {
        let _ = writeln!(msg, "  - {f}");
    }
    let _ = std::io::stderr()
        .write_all(format!("agent stderr:\n{err}\nagent stdout:\n{out}\n").as_bytes());
    bail!("{} check(s) failed:\n{msg}", failures.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_the_printer_writes_them() {
        assert_eq!(millis("40.3ms"), Some(40.3));
        assert_eq!(millis("425µs"), Some(0.425));
        assert_eq!(bytes("2.0KiB"), Some(2048.0));
        assert_eq!(bytes("184B,"), Some(184.0));
        let l = "x -> 10.0.0.2:8080 tcp-connect FORWARDED connect 40.3ms";
        assert_eq!(after(l, "connect").and_then(millis), Some(40.3));
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.file("/init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert!(out.len().is_multiple_of(4));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
