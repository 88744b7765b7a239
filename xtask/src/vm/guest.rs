//! The guest: its `/init`, the test script it runs inside the host's root, nginx's
//! configuration, and the initramfs that carries them.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::{DELAY_MS, EARLY_MODULES, FILE_BYTES, HOST_TAG, Kernel, LATE_MODULES, module_order};
use crate::check;

/// What the guest does after set-up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
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

pub(super) fn write_initramfs(
    path: &Path,
    kernel: &Kernel,
    agent: &Path,
    mode: Mode,
) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
