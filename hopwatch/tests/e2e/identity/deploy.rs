//! The deployment files, checked offline: every Kubernetes manifest validates (strictly: no
//! unknown fields) against Kubernetes 1.28 and the newest version `kubernetes-validate` knows;
//! nothing runs privileged; RBAC only reads what the agent watches; the probes, ServiceMonitor
//! and Services agree on ports; the systemd unit passes `systemd-analyze verify` and grants the
//! DaemonSet's capabilities; the Dockerfile's toolchain matches what `cargo xtask` installs.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn manifests() -> Vec<PathBuf> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "manifests missing: {files:?}");
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn all_documents() -> Vec<Value> {
    manifests().iter().flat_map(|p| documents(p)).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

/// Kinds defined by CRDs (the Prometheus Operator's), for which `kubernetes-validate` has no schema.
const CRD_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];

#[test]
fn manifests_validate_against_kubernetes_1_28_and_newer() {
    let tool = root().join("target/e2e-venv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: `cargo xtask test` installs it from hopwatch/tests/e2e/requirements.txt",
        tool.display()
    );
    for version in ["1.28.0", "1.37.0"] {
        for file in manifests() {
            let out = Command::new(&tool)
                .args(["--strict", "-k", version])
                .arg(&file)
                .output()
                .expect("run kubernetes-validate");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{} against {version}:\n{text}", file.display());
            for line in text.lines() {
                let ok = line.starts_with("INFO ") && line.contains(" passed for resource ")
                    || line.starts_with("WARN ")
                        && CRD_KINDS
                            .iter()
                            .any(|k| line.contains(&format!("Couldn't find schema for kind {k} ")));
                assert!(ok, "{} against {version}: {line}", file.display());
            }
            let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
            let expected = documents(&file)
                .iter()
                .filter(|d| !CRD_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
                .count();
            assert_eq!(
                passed,
                expected,
                "every non-CRD document of {} was validated:\n{text}",
                file.display()
            );
        }
    }
}

#[test]
fn nothing_in_deploy_runs_privileged() {
    let mut stack = vec![root().join("deploy")];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read deploy/").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                let l = line.split('#').next().unwrap_or("").replace(' ', "");
                assert!(!l.contains("privileged:true"), "{}:{}: {line}", p.display(), n + 1);
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "deploy/ has the manifests, Dockerfile and unit ({checked} files)");
    // Also structurally: no container of any workload asks for it.
    for d in all_documents() {
        for c in d["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten() {
            assert_ne!(c["securityContext"]["privileged"], true, "{}", d["metadata"]["name"]);
        }
    }
}

fn agent_capabilities(docs: &[Value]) -> BTreeSet<String> {
    let ds = find(docs, "DaemonSet", "hopwatch-agent");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    c["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|v| v.as_str().expect("capability name").to_owned())
        .collect()
}

#[test]
fn agent_daemonset_runs_everywhere_with_least_privilege_and_probes() {
    let docs = all_documents();
    let caps = agent_capabilities(&docs);
    let allowed: BTreeSet<String> =
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE", "SYS_PTRACE", "SYSLOG"]
            .map(String::from)
            .into();
    assert!(
        caps.is_subset(&allowed) && caps.contains("BPF") && caps.contains("PERFMON"),
        "{caps:?}"
    );
    assert!(!caps.contains("SYS_ADMIN"), "{caps:?}");
    let ds = find(&docs, "DaemonSet", "hopwatch-agent");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["tolerations"],
        serde_json::json!([{"operator": "Exists"}]),
        "runs on every node"
    );
    let c = &spec["containers"][0];
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string(),
        "{c}"
    );
    // Host mounts the agent needs; /proc read-only.
    let mounts: Vec<(String, bool)> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap().to_owned(), m["readOnly"] == true))
        .collect();
    for path in ["/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/cgroup", "/host/proc"] {
        assert!(mounts.contains(&(path.to_owned(), true)), "{path} mounted read-only: {mounts:?}");
    }
    // Probes on the metrics port's health endpoints.
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("metrics port");
    assert_eq!(port["containerPort"], 9965);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    // The metrics Service and the ServiceMonitor select the agents and name that port.
    let svc = find(&docs, "Service", "hopwatch-agent-metrics");
    let sm = find(&docs, "ServiceMonitor", "hopwatch-agent");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().expect("selector") {
        assert_eq!(&svc["metadata"]["labels"][k], v, "ServiceMonitor selects the metrics Service");
        assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][k], v);
    }
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "metrics"));
}

#[test]
fn rbac_only_reads_what_the_agent_watches() {
    let docs = all_documents();
    let role = find(&docs, "ClusterRole", "hopwatch-agent");
    let mut resources = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let verbs: BTreeSet<&str> =
            rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule}");
        for r in rule["resources"].as_array().unwrap() {
            resources.insert(r.as_str().unwrap().to_owned());
        }
    }
    let expected: BTreeSet<String> =
        ["pods", "services", "endpointslices", "replicasets", "jobs"].map(String::from).into();
    assert_eq!(resources, expected);
    assert!(!docs.iter().any(|d| d["kind"] == "Role"
        || d["kind"] == "ClusterRole" && d["metadata"]["name"] != "hopwatch-agent"));
    // The collector: its Service, and a NetworkPolicy letting in only port 4245.
    let np = find(&docs, "NetworkPolicy", "hopwatch-collector");
    for rule in np["spec"]["ingress"].as_array().expect("ingress rules") {
        assert_eq!(rule["ports"], serde_json::json!([{"port": 4245, "protocol": "TCP"}]), "{rule}");
    }
    assert_eq!(find(&docs, "Service", "hopwatch-collector")["spec"]["ports"][0]["port"], 4245);
}

#[test]
fn systemd_unit_verifies_and_grants_the_daemonsets_capabilities() {
    let unit =
        std::fs::read_to_string(root().join("deploy/systemd/hopwatch.service")).expect("unit");
    let bounding: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(bounding, agent_capabilities(&all_documents()));
    // `systemd-analyze verify` checks every directive and that ExecStart's binary exists: point
    // it at the binary these tests built.
    let dir = std::env::temp_dir().join(format!("hw-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("hopwatch.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/hopwatch", crate::support::agent::BIN))
        .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze is installed (`cargo xtask test` installs systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn dockerfile_builds_with_the_toolchain_xtask_installs() {
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let xtask = std::fs::read_to_string(root().join("xtask/src/main.rs")).expect("xtask");
    let xtask_const = |name: &str| {
        xtask
            .lines()
            .find_map(|l| l.strip_prefix(&format!("const {name}: &str = \"")))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("xtask has no {name}"))
            .to_owned()
    };
    let arg = |name: &str| {
        docker
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("Dockerfile has no ARG {name}"))
            .to_owned()
    };
    assert_eq!(arg("LLVM_MAJOR"), xtask_const("LLVM_MAJOR"));
    assert_eq!(arg("BPF_LINKER_VERSION"), xtask_const("BPF_LINKER_VERSION"));
    assert!(docker.contains(&format!("{}=/usr/lib/llvm-", xtask_const("LLVM_SYS_PREFIX_VAR"))));
    assert!(
        docker.contains("rust-src")
            && docker.contains("cargo build --release --locked -p hopwatch")
    );
    let rust = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let msrv = rust
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.split('"').next())
        .expect("rust-version");
    assert_eq!(arg("RUST_VERSION"), msrv, "the builder uses the workspace's Rust version");
    // Two stages: the build and a slim runtime with only the binary.
    assert_eq!(docker.lines().filter(|l| l.starts_with("FROM ")).count(), 2);
}
