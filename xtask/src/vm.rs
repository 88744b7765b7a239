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
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, check, output, say, workspace_root};

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

/// What the guest does after set-up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The checks against injected truth.
    Test,
    /// wrk against nginx with and without the agent, rounds alternated.
    Bench { rounds: u32, seconds: u32 },
}

/// The guest's `/init` (busybox, in the initramfs): modules, the host's root over 9p with tmpfs
/// where the test writes, then the test script inside it, then the report and power-off.
fn init_script(early: &[String]) -> String {
    let insmod = |mods: &[String]| {
        mods.iter().fold(String::new(), |mut s, m| {
            let _ = writeln!(s, "insmod /modules/{m} || echo '@@ insmod {m} failed'");
            s
        })
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# Modules come only from the lists here, never on demand.
echo /bin/false > /proc/sys/kernel/modprobe
{early}
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose {tag} /host; then
  echo '@@ the host root over 9p failed to mount'; echo '@@ done'; poweroff -f
fi
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
for d in /tmp /run /var/log /var/lib/nginx /root; do
  [ -d /host$d ] && mount -t tmpfs tmp /host$d
done
mount -t cgroup2 none /host/sys/fs/cgroup
mount -t tracefs nodev /host/sys/kernel/tracing; mount -t bpf bpf /host/sys/fs/bpf
mkdir -p /host/tmp/vm /host/tmp/late-modules
cp -a /vm/. /host/tmp/vm/; cp /bin/hopwatch /host/tmp/vm/hopwatch
# The test loads these itself (after the agent started).
cp -a /modules/. /host/tmp/late-modules/
chroot /host /bin/sh /tmp/vm/test.sh
for f in agent.err agent.out metrics bench; do
  [ -f /host/tmp/$f ] || continue
  echo "@@begin $f"; cat /host/tmp/$f; echo "@@end $f"
done
echo "@@ done"
poweroff -f
"#,
        early = insmod(early),
        tag = HOST_TAG,
    )
}

/// The test, run inside the host's root (`/tmp/vm/test.sh`): the same set-up for the checks and
/// the bench, then either.
fn test_script(late: &[String], mode: Mode) -> String {
    let insmod = late.iter().fold(String::new(), |mut s, m| {
        let _ = writeln!(s, "insmod /tmp/late-modules/{m} || echo '@@ insmod {m} failed'");
        s
    });
    let setup = format!(
        r#"export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
AGENT=/tmp/vm/hopwatch
progs() {{ bpftool prog show 2>/dev/null | grep -c '^[0-9]*:'; }}
echo "@@ kernel $(uname -r)"
ip link set lo up
ip netns add peer
ip link add veth0 type veth peer name veth1
ip link set veth1 netns peer
ip addr add 10.0.0.1/24 dev veth0; ip link set veth0 up
ip -n peer link set lo up; ip -n peer addr add 10.0.0.2/24 dev veth1; ip -n peer link set veth1 up
mkdir -p /tmp/www; head -c {file_bytes} /dev/zero | tr '\0' x > /tmp/www/file; echo ok > /tmp/www/small
ip netns exec peer busybox httpd -p 10.0.0.2:8080 -h /tmp/www
ip netns exec peer nginx -c /tmp/vm/nginx.conf -e /tmp/nginx-error.log || echo '@@ nginx failed'
ip netns exec peer redis-server --bind 10.0.0.2 --port 6379 --save '' --appendonly no \
  --protected-mode no --daemonize yes --logfile /tmp/redis.log || echo '@@ redis failed'
ip netns exec peer dnsmasq --port 53 --listen-address 10.0.0.2 --bind-interfaces --no-resolv \
  --no-hosts --address=/svc.test/10.0.0.7 --pid-file=/tmp/dnsmasq.pid || echo '@@ dnsmasq failed'
PG=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
mkdir -p /tmp/pg && chown postgres:postgres /tmp/pg
setpriv --reuid postgres --regid postgres --init-groups $PG/initdb -D /tmp/pg/data -A trust \
  -U postgres --no-sync >/tmp/initdb.log 2>&1 || {{ echo '@@ initdb failed'; cat /tmp/initdb.log; }}
echo 'host all all 10.0.0.0/24 trust' >> /tmp/pg/data/pg_hba.conf
ip netns exec peer setpriv --reuid postgres --regid postgres --init-groups $PG/postgres \
  -D /tmp/pg/data -c listen_addresses=10.0.0.2 -c unix_socket_directories=/tmp/pg -c fsync=off \
  >/tmp/pg.log 2>&1 &
i=0; while ! $PG/pg_isready -q -h 10.0.0.2 && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
$PG/pg_isready -q -h 10.0.0.2 || echo '@@ postgres failed'
# The neighbour entry first: an ARP exchange would add two delayed packets to the first connect.
busybox ping -c 1 -W 2 10.0.0.2 >/dev/null || echo '@@ ping failed'
start_agent() {{
  T0=$(date +%s)
  $AGENT agent --node-name vm --metrics-addr 127.0.0.1:9965 "$@" >/tmp/agent.out 2>/tmp/agent.err &
  AGENT_PID=$!
  i=0
  while ! grep -q 'hopwatch agent: metrics on' /tmp/agent.err && [ $i -lt 300 ]; do
    kill -0 $AGENT_PID 2>/dev/null || break
    sleep 1; i=$((i+1))
  done
  echo "@@ agent_start_seconds $(( $(date +%s) - T0 ))"
}}
"#,
        file_bytes = FILE_BYTES,
    );
    let body = match mode {
        Mode::Test => format!(
            r#"tc qdisc add dev veth0 root netem delay {delay}ms || echo '@@ netem failed'
echo "@@ progs_before $(progs)"
start_agent -o compact
sleep 2
for n in 1 2 3; do curl -sS -o /dev/null http://10.0.0.2:8080/file || echo '@@ curl failed'; done
for n in 1 2; do curl -sSk -o /dev/null https://10.0.0.2:8443/file || echo '@@ curl https failed'; done
redis-cli -h 10.0.0.2 SET hopwatch-vm-key v >/dev/null || echo '@@ redis-cli failed'
redis-cli -h 10.0.0.2 GET hopwatch-vm-key >/dev/null || echo '@@ redis-cli failed'
psql -h 10.0.0.2 -U postgres -Atc 'SELECT 42' >/dev/null || echo '@@ psql failed'
[ "$(dig +short +tries=1 +time=5 @10.0.0.2 svc.test)" = 10.0.0.7 ] || echo '@@ dig failed'
busybox nc 10.0.0.2 9 </dev/null && echo '@@ port 9 answered'
{late}ip netns exec peer nft add table inet hw
ip netns exec peer nft add chain inet hw in '{{ type filter hook input priority 0; }}'
ip netns exec peer nft add rule inet hw in tcp dport 7777 drop
timeout 3 busybox nc 10.0.0.2 7777 </dev/null
sleep 3
curl -sS -o /tmp/metrics http://127.0.0.1:9965/metrics || echo '@@ scrape failed'
echo "@@ progs_running $(progs)"
kill -9 $AGENT_PID
sleep 2
echo "@@ progs_after_kill $(progs)"
"#,
            delay = DELAY_MS,
            late = insmod,
        ),
        Mode::Bench { rounds, seconds } => format!(
            r#"# Round by round, modes alternated: no agent, then the agent with full L7 capture.
for r in $(seq 1 {rounds}); do
  for m in none l7; do
    if [ $m = l7 ]; then start_agent -o none; sleep 2; fi
    wrk -t 2 -c 16 -d {seconds}s http://10.0.0.2:8081/small >/tmp/wrk.out 2>&1 || echo '@@ wrk failed'
    echo "round $r $m $(awk '/^Requests\/sec/ {{print $2}}' /tmp/wrk.out)" >> /tmp/bench
    if [ $m = l7 ]; then
      curl -sS -o /tmp/metrics http://127.0.0.1:9965/metrics
      echo "cpu $r $(awk '{{print $14 + $15}}' /proc/$AGENT_PID/stat) $(getconf CLK_TCK)" >> /tmp/bench
      kill $AGENT_PID; wait $AGENT_PID
    fi
  done
done
"#
        ),
    };
    setup + &body
}

/// nginx in the guest: TLS on 8443 (the checks), plain on 8081 (the bench).
fn nginx_conf() -> String {
    r#"daemon on;
pid /tmp/nginx.pid;
worker_processes 1;
error_log /tmp/nginx-error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path /tmp/nginx-body;
    proxy_temp_path /tmp/nginx-proxy;
    fastcgi_temp_path /tmp/nginx-fastcgi;
    uwsgi_temp_path /tmp/nginx-uwsgi;
    scgi_temp_path /tmp/nginx-scgi;
    server {
        listen 10.0.0.2:8443 ssl;
        ssl_certificate /tmp/vm/cert.pem;
        ssl_certificate_key /tmp/vm/key.pem;
        root /tmp/www;
    }
    server {
        listen 10.0.0.2:8081;
        keepalive_requests 1000000;
        root /tmp/www;
    }
}
"#
    .to_owned()
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

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn write_initramfs(path: &Path, kernel: &Kernel, agent: &Path, mode: Mode) -> Result<()> {
    let early = module_order(kernel, EARLY_MODULES)?;
    let late = module_order(kernel, LATE_MODULES)?;
    let (cert, key) = test_certificate(path.parent().unwrap_or(Path::new(".")))?;
    let mut c = Cpio::default();
    for d in ["/bin", "/sbin", "/proc", "/sys", "/dev", "/vm", "/modules"] {
        c.dir(d);
    }
    c.file("/bin/busybox", 0o755, &read(Path::new("/bin/busybox"))?);
    c.file("/init", 0o755, init_script(&early).as_bytes());
    c.file("/bin/hopwatch", 0o755, &read(agent)?);
    c.file("/vm/test.sh", 0o755, test_script(&late, mode).as_bytes());
    c.file("/vm/nginx.conf", 0o644, nginx_conf().as_bytes());
    c.file("/vm/cert.pem", 0o644, &cert);
    c.file("/vm/key.pem", 0o600, &key);
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

/// A self-signed certificate for the guest's nginx (made once with openssl).
fn test_certificate(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        check(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"])
                .args(["-subj", "/CN=vm.test", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
    }
    Ok((read(&cert)?, read(&key)?))
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

/// Application exchanges, one kind per server, each seen at both ends: the client's end waits
/// for the request's injected [`DELAY_MS`] in netem, so its latency is at least that, and at
/// least that more than the server's.
fn check_exchanges(out: &str, fail: &mut impl FnMut(String)) {
    let kinds = [
        ("HTTP", "10.0.0.2:8080", "http-response", "/file → 200", 3),
        ("HTTPS through nginx (TLS uprobes)", "10.0.0.2:8443", "http-response", "/file → 200", 2),
        ("Redis", "10.0.0.2:6379", "redis-response", "Redis SET", 1),
        ("Redis", "10.0.0.2:6379", "redis-response", "Redis GET", 1),
        ("PostgreSQL", "10.0.0.2:5432", "postgres-response", "PostgreSQL SELECT", 1),
        ("DNS", "10.0.0.2:53", "dns-response", "10.0.0.7", 1),
    ];
    for (what, server, kind, summary, count) in kinds {
        // Per client port: (latency at the client, at the server). The second end to report
        // names the first's time (`(server 6.1ms)` at the client, `(client 46.3ms)` at the
        // server); where the ends are not paired (DNS over an unconnected socket), each end is
        // the one whose process the line names.
        let mut ends: BTreeMap<&str, (Option<f64>, Option<f64>)> = BTreeMap::new();
        for l in out.lines().filter(|l| {
            l.contains(&format!("-> {server} ")) && l.contains(kind) && l.contains(summary)
        }) {
            let Some(port) = l.split_whitespace().find(|w| w.starts_with("10.0.0.1:")) else {
                continue;
            };
            let Some(own) = after(l, "in").and_then(millis) else { continue };
            let peer = |key: &str| after(l, key).and_then(|v| millis(v.trim_end_matches(')')));
            let e = ends.entry(port).or_default();
            if let Some(at_server) = peer("(server") {
                *e = (Some(own), Some(at_server));
            } else if let Some(at_client) = peer("(client") {
                *e = (Some(at_client), Some(own));
            } else if l.contains(&format!("-> {server} (")) {
                e.1.get_or_insert(own);
            } else {
                e.0.get_or_insert(own);
            }
        }
        let both: Vec<(f64, f64)> =
            ends.values().filter_map(|(c, s)| Some(((*c)?, (*s)?))).collect();
        if both.len() < count {
            fail(format!(
                "{what}: {count} `{summary}` exchanges made, {} reported at both ends: {ends:?}",
                both.len()
            ));
        }
        for (at_client, at_server) in &both {
            if !(DELAY_MS - 1.0..=DELAY_MS * 4.0).contains(at_client)
                || at_client - at_server < DELAY_MS - 1.0
            {
                fail(format!(
                    "{what}: `{summary}` took {at_client:.1} ms at the client and {at_server:.1} \
                     ms at the server; the request was delayed {DELAY_MS} ms between them"
                ));
            }
        }
        say(&format!("{what} `{summary}`: (client, server) ms {both:.1?}"));
    }
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

    // Start-up: running, L7 capture on the syscall path, address translation unavailable.
    for (what, needle) in [
        (
            "the agent captures L7 through syscall tracepoints (no sock:sock_send_length on 6.1)",
            "hopwatch agent: l7_capture: on, via tracepoint/syscalls/sys_{enter,exit}_",
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
        ("the agent attaches its TLS uprobes", "hopwatch agent: tls: on, via uprobe/SSL_read"),
    ] {
        if !err.contains(needle) {
            fail(format!("{what}: no `{needle}` on its stderr"));
        }
    }
    if !metrics.lines().any(|l| {
        l.starts_with("hopwatch_capability_up{capability=\"l7_capture\"") && l.ends_with(" 1")
    }) {
        fail("/metrics has no hopwatch_capability_up{capability=\"l7_capture\"} 1".to_owned());
    }
    check_exchanges(out, &mut fail);
    // TLS handshakes from the records on the wire: TLS 1.2 (nginx 1.22's default) takes two
    // round trips, each carrying the injected delay once, at both ends.
    let handshakes: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("-> 10.0.0.2:8443 ") && l.contains("TLS 1.2 handshake"))
        .filter_map(|l| after(l, "in").and_then(millis))
        .collect();
    if handshakes.len() < 4 {
        fail(format!(
            "2 TLS connections to nginx, {} handshakes reported (of 4: both ends)",
            handshakes.len()
        ));
    }
    for ms in &handshakes {
        if *ms < 2.0 * DELAY_MS - 1.0 {
            fail(format!("a TLS 1.2 handshake took {ms:.1} ms, two round trips of {DELAY_MS} ms"));
        }
    }
    say(&format!("TLS 1.2 handshakes with nginx: {handshakes:.1?} ms"));

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
