//! The network-namespace test bed: "pods" are network namespaces joined by veth pairs to a bridge
//! that lives in its own "switch" namespace, so the host's own network is never touched. Delay,
//! loss and drop rules are injected per pod; every namespace, rule and process is removed when the
//! [`Testbed`] is dropped, also when a test panics.

pub(crate) mod agent;
pub(crate) mod nfqueue;
pub(crate) mod peers;
pub(crate) mod servers;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use self::nfqueue::Delayer;

/// Serialises the end-to-end tests: they share the host's kernel hooks and the agent binary.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails the test (never skips it) when not root.
pub(crate) fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load eBPF programs and create network namespaces: run them as root \
         (`sudo -E cargo xtask test`)"
    );
}

/// Runs a command, panicking with its output when it fails.
pub(crate) fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (is it installed? `cargo xtask test` installs test dependencies)"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A pod: a network namespace with one interface on the test bed's bridge.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    /// `/run/netns/<name>`, for setns(2).
    pub(crate) fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// Inode of the pod's network namespace (what hopwatch reports as `netns_inode`).
    pub(crate) fn netns_inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.netns_path()).expect("netns exists").ino()
    }

    /// A command that runs `args` inside the pod.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        c
    }

    /// Runs `args` inside the pod, panicking on failure.
    pub(crate) fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.netns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Loses each packet `from` sends to this pod with probability `p`, on arrival (a drop
    /// in the sender's own output path is not a loss: TCP just sends the segment again later
    /// without counting a retransmission).
    pub(crate) fn lose_from(&self, from: &Pod, p: f64) {
        let p = format!("{p}");
        self.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-s",
            &from.ip.to_string(),
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ]);
    }

    /// Loads an nft ruleset (text for `nft -f -`) into this pod.
    pub(crate) fn nft(&self, ruleset: &str) {
        use std::io::Write as _;
        let mut child = self
            .command(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft is installed (`cargo xtask test` installs nftables)");
        child.stdin.take().expect("piped").write_all(ruleset.as_bytes()).expect("write ruleset");
        let out = child.wait_with_output().expect("nft ran");
        assert!(out.status.success(), "nft -f failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// One test bed: a switch namespace with a bridge, and pods attached to it.
pub(crate) struct Testbed {
    id: u8,
    switch: String,
    pods: Vec<Pod>,
    children: Vec<Child>,
    delayers: Vec<Delayer>,
}

impl Testbed {
    /// Creates the switch namespace and its bridge. Addresses are `10.213.<id>.0/24` and
    /// `fd00:213:<id>::/64`, unique per test bed in this process.
    pub(crate) fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        require_root();
        let spread = std::process::id() % 100 + NEXT.fetch_add(1, Ordering::Relaxed);
        let id = u8::try_from(20 + spread % 200).expect("below 220");
        let switch = format!("hw{id}-switch");
        // A leftover from a killed run of the same id would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &switch]).stderr(Stdio::null()).status();
        run(&["ip", "netns", "add", &switch]);
        let tb = Self { id, switch, pods: Vec::new(), children: Vec::new(), delayers: Vec::new() };
        tb.in_switch(&["ip", "link", "add", "br0", "type", "bridge"]);
        tb.in_switch(&["ip", "link", "set", "br0", "up"]);
        tb.in_switch(&["ip", "link", "set", "lo", "up"]);
        tb
    }

    fn in_switch(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.switch];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Adds a pod with the next free address, attached to the bridge.
    pub(crate) fn pod(&mut self, name: &str) -> Pod {
        let n = u8::try_from(self.pods.len() + 2).expect("fewer than 250 pods");
        let netns = format!("hw{}-{name}", self.id);
        let _ = Command::new("ip").args(["netns", "del", &netns]).stderr(Stdio::null()).status();
        run(&["ip", "netns", "add", &netns]);
        let port = format!("p{n}");
        run(&[
            "ip",
            "link",
            "add",
            &port,
            "netns",
            &self.switch,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        self.in_switch(&["ip", "link", "set", &port, "master", "br0"]);
        self.in_switch(&["ip", "link", "set", &port, "up"]);
        let pod = Pod {
            netns,
            ip: Ipv4Addr::new(10, 213, self.id, n),
            ip6: format!("fd00:213:{}::{n}", self.id).parse().expect("valid v6"),
        };
        pod.exec(&["ip", "link", "set", "lo", "up"]);
        pod.exec(&["ip", "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"]);
        pod.exec(&["ip", "-6", "addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"]);
        pod.exec(&["ip", "link", "set", "eth0", "up"]);
        self.pods.push(pod.clone());
        pod
    }

    /// Keeps a child started elsewhere (e.g. with piped output) for cleanup.
    pub(crate) fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Delays every packet `from` sends to `to` (IPv4 and IPv6) by `delay`.
    pub(crate) fn delay(&mut self, from: &Pod, to: &Pod, delay: Duration) {
        static NEXT_QUEUE: AtomicU32 = AtomicU32::new(0);
        let queue = 10 + (NEXT_QUEUE.fetch_add(1, Ordering::Relaxed) % 1000) as u16;
        let delayer = Delayer::start(from.netns_path(), queue, delay)
            .unwrap_or_else(|e| panic!("cannot start the NFQUEUE delayer in {}: {e}", from.netns));
        self.delayers.push(delayer);
        let q = queue.to_string();
        for (tool, dst) in [("iptables", to.ip.to_string()), ("ip6tables", to.ip6.to_string())] {
            from.exec(&[tool, "-A", "OUTPUT", "-d", &dst, "-j", "NFQUEUE", "--queue-num", &q]);
        }
    }
}

impl Default for Testbed {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for d in &mut self.delayers {
            let _ = d.stop();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace removes its interfaces, bridge, routes and firewall rules.
        for pod in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &pod.netns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.switch]).status();
    }
}
