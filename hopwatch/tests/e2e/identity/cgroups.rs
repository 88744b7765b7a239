//! Containers named by their cgroups: client processes are moved into cgroups laid out the way
//! containerd (under the kubelet), Docker (systemd and cgroupfs drivers) and systemd lay them out,
//! under the host's cgroup v2 mount; their flows must name the container id (and Docker's name
//! and compose service, from a Docker API socket the test serves) or the unit. One cgroup is
//! created after the agent started, so the walker has to find it on demand.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use super::{TempFile, labels, wait_identity};
use crate::support::{
    Pod, Testbed,
    agent::{Agent, ip_src, socket_event, tcp_port},
    peers, serial,
};

const CONTAINERD_ID: &str = "4f2d1a9c3b7e8d6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e21";
const DOCKER_ID: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a87";
const DOCKER_FS_ID: &str = "1111222233334444555566667777888899990000aaaabbbbccccddddeeeeffff";
const POD_UID: &str = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b";

/// A cgroup subtree for this test, removed (with the processes moved back out) on drop.
struct CgroupTree {
    root: PathBuf,
    top: PathBuf,
}

impl CgroupTree {
    fn new() -> Self {
        let root = hopwatch::harness::cgroup2_mount()
            .expect("a cgroup v2 hierarchy is mounted (the agent's sock_ops program needs it too)");
        let top = root.join(format!("hwtest-{}", std::process::id()));
        let _ = std::fs::create_dir(&top);
        Self { root, top }
    }

    /// Creates `rel` (a path of nested cgroups) and returns its full path.
    fn make(&self, rel: &str) -> PathBuf {
        let p = self.top.join(rel);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", p.display()));
        p
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // Deepest first; processes still inside (none normally: the clients exited) go to the root.
        let mut dirs = Vec::new();
        let mut stack = vec![self.top.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Connects, sends a few bytes, closes, prints the local port.
const CLIENT: &str = r#"
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
port = s.getsockname()[1]
s.sendall(b"hello")
s.close()
print(json.dumps({"local_port": port}), flush=True)
"#;

/// Runs the test client inside `cgroup`: a shell moves itself in, then execs into the pod.
fn client_in(cgroup: &Path, pod: &Pod, server: &Pod) -> u16 {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\" {} 7000",
        cgroup.display(),
        pod.netns,
        server.ip
    );
    let out = Command::new("sh").args(["-c", &script, CLIENT]).output().expect("sh runs");
    assert!(
        out.status.success(),
        "client in {} failed: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");
    u16::try_from(report["local_port"].as_u64().expect("local port")).expect("port")
}

/// A Docker Engine API answering `GET /containers/json` with one compose container, on a Unix
/// socket, in a thread; the response body is the shape Docker's API documents.
fn fake_docker(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).expect("bind the Docker API socket");
    let body = serde_json::json!([{
        "Id": DOCKER_ID,
        "Names": ["/shop-web-1"],
        "Image": "shop/web:1.4",
        "State": "running",
        "Labels": {
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "web",
            "com.docker.compose.container-number": "1"
        }
    }])
    .to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut req = [0u8; 4096];
            let n = s.read(&mut req).unwrap_or(0);
            let head = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if head.starts_with("GET /containers/json") {
                ("200 OK", body.as_str())
            } else {
                ("404 Not Found", "{\"message\":\"page not found\"}")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

#[test]
fn processes_in_container_cgroups_are_named_by_container_id() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (client, server) = (tb.pod("ctr"), tb.pod("srv"));
    peers::server(&mut tb, &server, server.ip.into(), 7000, 10);
    let tree = CgroupTree::new();
    let uid_ = POD_UID.replace('-', "_");
    let containerd = tree.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CONTAINERD_ID}.scope"
    ));
    let docker = tree.make(&format!("system.slice/docker-{DOCKER_ID}.scope"));
    let unit = tree.make("system.slice/hwtest-app.service");
    let socket =
        TempFile(std::env::temp_dir().join(format!("hw-{}-docker.sock", std::process::id())));
    fake_docker(&socket.0);

    let agent = Agent::start(&["--docker-socket", socket.path()]);
    wait_identity(&agent);
    // Created after the agent's first cgroup walk: found by the walk a miss triggers.
    let docker_fs = tree.make(&format!("docker/{DOCKER_FS_ID}"));

    let cases: [(&Path, &[&str]); 4] = [
        (&containerd, &["container.runtime=containerd"]),
        (&docker, &["container.runtime=docker", "container.name=shop-web-1"]),
        (&docker_fs, &["container.runtime=docker"]),
        (&unit, &[]),
    ];
    for (cgroup, expected) in cases {
        let port = client_in(cgroup, &client, &server);
        // The CONNECT flow is the connection's first: it must be named already.
        let f = agent.wait_for("CONNECT from the cgroup's client", Duration::from_secs(15), |f| {
            socket_event(f) == "CONNECT"
                && ip_src(f) == client.ip.to_string()
                && tcp_port(f, "source_port") == u64::from(port)
        });
        let l = labels(&f["source"]);
        let id = cgroup
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".scope")
            .rsplit('-')
            .next()
            .unwrap()
            .to_owned();
        if cgroup == unit {
            assert!(l.contains(&"systemd.unit=hwtest-app.service".to_owned()), "{f}");
            assert!(!l.iter().any(|x| x.starts_with("container.")), "{f}");
            continue;
        }
        assert!(l.contains(&format!("container.id={id}")), "{} → {f}", cgroup.display());
        for e in expected {
            assert!(l.contains(&(*e).to_owned()), "{e} missing for {}: {f}", cgroup.display());
        }
        if cgroup == docker {
            // A compose container: named like a pod, its service as the workload.
            assert_eq!(f["source"]["pod_name"], "shop-web-1", "{f}");
            assert_eq!(f["source"]["namespace"], "shop", "{f}");
            assert_eq!(f["source"]["workloads"][0]["name"], "web", "{f}");
            assert_eq!(f["source"]["workloads"][0]["kind"], "ComposeService", "{f}");
        }
    }
}
