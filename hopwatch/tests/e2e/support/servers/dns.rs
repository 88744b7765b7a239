//! dnsmasq as the topology's DNS server, and the per-namespace resolv.conf that sends a pod's
//! lookups to it.

use std::{net::Ipv4Addr, path::PathBuf};

use super::{ServerProcess, TempDir};
use crate::support::Pod;

/// A dnsmasq answering A records for the names it is given, authoritative for `domain` (any other
/// name in it gets NXDOMAIN), with no upstream servers, no DHCP and every query logged.
pub(crate) struct Dnsmasq {
    process: ServerProcess,
    _dir: TempDir,
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Dnsmasq {
    pub(crate) const PORT: u16 = 53;

    /// Starts dnsmasq in `pod`; `records` are (fully qualified name, address) pairs.
    pub(crate) fn start(pod: &Pod, domain: &str, records: &[(&str, Ipv4Addr)]) -> Self {
        let dir = TempDir::new("dnsmasq");
        let ip = pod.ip;
        let mut args: Vec<String> = [
            "dnsmasq",
            "--no-daemon",
            // Neither Debian's /etc/dnsmasq.conf, /etc/hosts nor /etc/resolv.conf: only the
            // records given here.
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--no-poll",
            "--bind-interfaces",
            "--log-queries",
            "--log-facility=-",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend([
            format!("--listen-address={ip}"),
            format!("--port={}", Self::PORT),
            format!("--pid-file={}", dir.file("dnsmasq.pid")),
            format!("--local=/{domain}/"),
        ]);
        args.extend(records.iter().map(|(name, addr)| format!("--host-record={name},{addr}")));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = ServerProcess::spawn(
            "dnsmasq",
            pod,
            &arg_refs,
            &[],
            dir.path().join("log"),
            libc::SIGTERM,
        );
        let (server, port) = (format!("@{ip}"), Self::PORT.to_string());
        let probe = format!("ready-probe.{domain}");
        // Any answer will do (this name is NXDOMAIN); dig exits non-zero when none comes.
        process.wait_until("answering queries", || {
            super::succeeds(pod, &["dig", "+time=1", "+tries=1", &server, "-p", &port, &probe])
        });
        Self { process, _dir: dir, ip, port: Self::PORT }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// dnsmasq's log: one `query[A] <name> from <ip>` line per query and a line with its answer.
    pub(crate) fn log(&self) -> String {
        self.process.log()
    }

    /// Makes every process started in `pod` from now on resolve names through this server.
    pub(crate) fn resolver_for(&self, pod: &Pod) -> ResolvConf {
        ResolvConf::new(pod, self.ip)
    }
}

/// `/etc/netns/<netns>/resolv.conf`, which `ip netns exec` bind-mounts over /etc/resolv.conf
/// for the commands it starts; removed on drop.
pub(crate) struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    pub(crate) fn new(pod: &Pod, nameserver: Ipv4Addr) -> Self {
        let dir = PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // A lost datagram costs one second instead of glibc's default five.
        let text = format!("nameserver {nameserver}\noptions timeout:1 attempts:3\n");
        let file = dir.join("resolv.conf");
        std::fs::write(&file, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        Self { dir }
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
