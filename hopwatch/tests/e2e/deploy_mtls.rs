//! Mutual TLS between agents and the collector, as shipped: the default manifests rendered
//! offline (the kustomizations' resources, JSON patches and `images`, as `kubectl kustomize`
//! applies them) wire each side's certificate, key and CA from the Secrets `hopwatch certs` and
//! cert-manager write, validate against Kubernetes' schemas, and plaintext is only the
//! `plaintext` overlay; then certificates from `hopwatch certs` carry flows between a real agent
//! and a real collector, and a client without one is refused.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{Testbed, agent::BIN, peers, serial};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn yaml_docs(text: &str, what: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{}: {e}", what.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The documents `kubectl kustomize dir` would print, for the features these kustomizations
/// use: `resources` (files and directories), `patches` with a target and JSON 6902 operations
/// (`replace`, `remove`), and `images`.
fn render(dir: &Path) -> Vec<Value> {
    let k_path = dir.join("kustomization.yaml");
    let k = &yaml_docs(&std::fs::read_to_string(&k_path).expect("kustomization.yaml"), &k_path)[0];
    let mut docs = Vec::new();
    for r in k["resources"].as_array().expect("resources") {
        let path = dir.join(r.as_str().expect("a path"));
        if path.is_dir() {
            docs.extend(render(&path));
        } else {
            docs.extend(yaml_docs(&std::fs::read_to_string(&path).expect("resource"), &path));
        }
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        let (kind, name) = (&p["target"]["kind"], &p["target"]["name"]);
        let ops: Vec<Value> = yaml_docs(p["patch"].as_str().expect("inline patch"), &k_path)
            .into_iter()
            .flat_map(|d| d.as_array().cloned().unwrap_or_default())
            .collect();
        let doc = docs
            .iter_mut()
            .find(|d| d["kind"] == *kind && d["metadata"]["name"] == *name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name} to patch", k_path.display()));
        for op in ops {
            let path = op["path"].as_str().expect("op path");
            let (parent, last) = path.rsplit_once('/').expect("a JSON pointer");
            match op["op"].as_str() {
                Some("replace") => {
                    *doc.pointer_mut(path).unwrap_or_else(|| panic!("{path} not in {name}")) =
                        op["value"].clone();
                }
                Some("remove") => {
                    let p = doc.pointer_mut(parent).unwrap_or_else(|| panic!("{parent}"));
                    match p {
                        Value::Array(a) => {
                            a.remove(last.parse().expect("an index"));
                        }
                        Value::Object(o) => {
                            o.remove(last).unwrap_or_else(|| panic!("{path} not in {name}"));
                        }
                        _ => panic!("{path}: not a container"),
                    }
                }
                other => panic!("op {other:?} is not rendered by this test"),
            }
        }
    }
    for img in k["images"].as_array().into_iter().flatten() {
        let new = format!(
            "{}:{}",
            img["newName"].as_str().expect("newName"),
            img["newTag"].as_str().expect("newTag")
        );
        for d in &mut docs {
            for c in d
                .pointer_mut("/spec/template/spec/containers")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if c["image"] == img["name"] {
                    c["image"] = Value::String(new.clone());
                }
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn args(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{name}=")))
}

/// The Secret and key a file path in `workload`'s container comes from.
fn secret_file(workload: &Value, path: &str) -> (String, String) {
    let spec = &workload["spec"]["template"]["spec"];
    let mount = spec["containers"][0]["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap_or("-"))))
        .unwrap_or_else(|| panic!("{path} is on no mount"));
    let volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    let secret = volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not from a Secret: {volume}"));
    let key = &path[mount["mountPath"].as_str().expect("mountPath").len() + 1..];
    (secret.to_owned(), key.to_owned())
}

/// Every mount names a volume and every volume is mounted.
fn assert_volumes_wired(docs: &[Value]) {
    for d in docs {
        let spec = &d["spec"]["template"]["spec"];
        let Some(volumes) = spec["volumes"].as_array() else { continue };
        let names: BTreeSet<&str> = volumes.iter().filter_map(|v| v["name"].as_str()).collect();
        let mut mounted = BTreeSet::new();
        for c in spec["containers"].as_array().into_iter().flatten() {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let n = m["name"].as_str().expect("mount name");
                assert!(names.contains(n), "{}: mount {n} has no volume", d["metadata"]["name"]);
                mounted.insert(n);
            }
        }
        assert_eq!(mounted, names, "{}: volumes not mounted", d["metadata"]["name"]);
    }
}

/// The Secrets `hopwatch certs --kubernetes-secrets` writes: name → keys.
fn certs_secrets(dir: &Path) -> Vec<(String, BTreeSet<String>)> {
    let out = Command::new(BIN)
        .args(["certs", "--out-dir"])
        .arg(dir)
        .args(["--kubernetes-secrets", "hopwatch"])
        .output()
        .expect("run hopwatch certs");
    assert!(out.status.success(), "hopwatch certs: {}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("secrets.yaml");
    yaml_docs(&std::fs::read_to_string(&path).expect("secrets.yaml"), &path)
        .iter()
        .map(|d| {
            let keys = d["stringData"].as_object().expect("stringData").keys().cloned().collect();
            (d["metadata"]["name"].as_str().expect("name").to_owned(), keys)
        })
        .collect()
}

/// `kubernetes-validate --strict` on `docs` (CRD kinds, which it has no schema for, left out).
fn validate(docs: &[Value], what: &str) {
    let tool = root().join("target/e2e-venv/bin/kubernetes-validate");
    assert!(tool.exists(), "{} is missing: `cargo xtask test` installs it", tool.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if ["ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"].contains(&kind) {
            continue;
        }
        let file = dir.path().join(format!("{n}.json"));
        n += 1;
        std::fs::write(&file, d.to_string()).expect("write rendered document");
        let out = Command::new(&tool)
            .args(["--strict", "-k", "1.28.0"])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains(" passed for resource "),
            "{what}: {kind} {} does not validate:\n{text}",
            d["metadata"]["name"]
        );
    }
    assert!(n >= 3, "{what}: only {n} documents validated");
}

#[test]
fn the_default_manifests_wire_mutual_tls_between_agents_and_the_collector() {
    let base = root().join("deploy/kubernetes");
    let docs = render(&base);
    validate(&docs, "deploy/kubernetes");
    assert_volumes_wired(&docs);
    let pki = tempfile::tempdir().expect("tempdir");
    let secrets = certs_secrets(pki.path());
    let secret_keys = |name: &str| {
        secrets.iter().find(|(n, _)| n == name).map(|(_, k)| k.clone()).unwrap_or_default()
    };

    let collector = find(&docs, "Deployment", "hopwatch-collector");
    let c_args = args(collector);
    assert!(!c_args.iter().any(|a| a == "--allow-plaintext"), "{c_args:?}");
    let agent = find(&docs, "DaemonSet", "hopwatch-agent");
    let a_args = args(agent);
    assert!(!a_args.iter().any(|a| a == "--allow-plaintext"), "{a_args:?}");
    for (workload, args, flags) in [
        (collector, &c_args, ["--tls-cert", "--tls-key", "--tls-client-ca"]),
        (agent, &a_args, ["--tls-cert", "--tls-key", "--tls-ca"]),
    ] {
        let mut from = BTreeSet::new();
        for f in flags {
            let path = flag(args, f).unwrap_or_else(|| panic!("{f} missing: {args:?}"));
            let (secret, key) = secret_file(workload, path);
            // `hopwatch certs` writes that key in that Secret.
            assert!(secret_keys(&secret).contains(&key), "{f}: {secret}/{key} from hopwatch certs");
            from.insert(secret);
        }
        assert_eq!(from.len(), 1, "{flags:?} from one Secret: {from:?}");
    }
    // The agent dials the collector's Service over TLS, by a name in its certificate.
    let url = flag(&a_args, "--collector").expect("--collector");
    let service = find(&docs, "Service", "hopwatch-collector");
    let ns = service["metadata"]["namespace"].as_str().expect("namespace");
    let port = service["spec"]["ports"][0]["port"].as_u64().expect("port");
    assert_eq!(url, format!("https://hopwatch-collector.{ns}.svc:{port}"));
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(pki.path().join("collector.crt"))
        .output()
        .expect("openssl runs");
    let sans = String::from_utf8_lossy(&out.stdout);
    assert!(sans.contains(&format!("DNS:hopwatch-collector.{ns}.svc")), "{sans}");

    // The image is the kustomize parameter, never the unpublished one.
    let k = std::fs::read_to_string(base.join("kustomization.yaml")).expect("kustomization");
    let k = &yaml_docs(&k, &base)[0];
    let image = format!(
        "{}:{}",
        k["images"][0]["newName"].as_str().expect("newName"),
        k["images"][0]["newTag"].as_str().expect("newTag")
    );
    for w in [collector, agent] {
        assert_eq!(w["spec"]["template"]["spec"]["containers"][0]["image"], image.as_str());
    }
    for f in ["collector.yaml", "daemonset.yaml", "kustomization.yaml"] {
        let text = std::fs::read_to_string(base.join(f)).expect("manifest");
        assert!(!text.contains("ghcr.io/hopwatch"), "{f} names an image that does not exist");
    }

    // cert-manager issues the same Secrets with the same keys (tls.crt, tls.key, ca.crt are
    // what cert-manager writes for a CA Issuer).
    let cm = render(&base.join("cert-manager"));
    let issued: BTreeSet<&str> = cm
        .iter()
        .filter(|d| d["kind"] == "Certificate")
        .filter_map(|d| d["spec"]["secretName"].as_str())
        .collect();
    for (workload, f) in [(collector, "--tls-cert"), (agent, "--tls-cert")] {
        let (secret, _) = secret_file(workload, flag(&args(workload), f).expect("flag"));
        assert!(issued.contains(secret.as_str()), "cert-manager issues {secret}: {issued:?}");
        assert!(secrets.iter().any(|(n, _)| *n == secret), "hopwatch certs writes {secret}");
    }
    validate(&cm, "deploy/kubernetes/cert-manager");

    // Plaintext only as the overlay says so.
    let plain = render(&base.join("overlays/plaintext"));
    validate(&plain, "overlays/plaintext");
    assert_volumes_wired(&plain);
    let pa = args(find(&plain, "DaemonSet", "hopwatch-agent"));
    assert!(pa.iter().any(|a| a == "--allow-plaintext"), "{pa:?}");
    assert!(flag(&pa, "--collector").is_some_and(|u| u.starts_with("http://")), "{pa:?}");
    let pc = args(find(&plain, "Deployment", "hopwatch-collector"));
    assert!(pc.iter().any(|a| a == "--allow-plaintext") && flag(&pc, "--tls-cert").is_none());

    // And the generated Secrets themselves are valid Kubernetes objects.
    let path = pki.path().join("secrets.yaml");
    validate(&yaml_docs(&std::fs::read_to_string(&path).expect("secrets"), &path), "secrets.yaml");
}

/// A child that prints its listening address on stderr; killed when dropped.
struct Listening {
    child: Child,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_collector(pki: &Path) -> (Listening, u16) {
    let mut child = Command::new(BIN)
        .args(["collector", "--listen", "127.0.0.1:0", "--memory-only", "--tls-cert"])
        .arg(pki.join("collector.crt"))
        .arg("--tls-key")
        .arg(pki.join("collector.key"))
        .arg("--tls-client-ca")
        .arg(pki.join("ca.crt"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hopwatch collector");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line).expect("stderr");
    assert!(line.contains("(mutual TLS)"), "collector said {line:?}");
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .port();
    (Listening { child }, port)
}

fn observe(port: u16, pki: &Path, with_client_cert: bool) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(["observe", "--server", &format!("https://localhost:{port}"), "--all", "-o", "json"])
        .arg("--tls-ca-cert-files")
        .arg(pki.join("ca.crt"));
    if with_client_cert {
        c.arg("--tls-client-cert-file")
            .arg(pki.join("client.crt"))
            .arg("--tls-client-key-file")
            .arg(pki.join("client.key"));
    }
    c.output().expect("run hopwatch observe")
}

#[test]
fn certificates_from_hopwatch_certs_carry_flows_from_a_real_agent_to_a_real_collector() {
    let _serial = serial();
    let pki = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["certs", "--out-dir"])
        .arg(pki.path())
        .output()
        .expect("run hopwatch certs");
    assert!(out.status.success(), "hopwatch certs: {}", String::from_utf8_lossy(&out.stderr));
    let (_collector, port) = start_collector(pki.path());
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("client"), tb.pod("server"));
    let agent = crate::support::agent::Agent::start(&[
        "--collector",
        &format!("https://localhost:{port}"),
        "--tls-ca",
        pki.path().join("ca.crt").to_str().expect("UTF-8"),
        "--tls-cert",
        pki.path().join("agent.crt").to_str().expect("UTF-8"),
        "--tls-key",
        pki.path().join("agent.key").to_str().expect("UTF-8"),
    ]);
    peers::server(&mut tb, &b, b.ip.into(), 8080, 10);
    let c = peers::client(&a, b.ip.into(), 8080, 100, Duration::from_secs(10), Duration::ZERO);
    assert!(c.ok, "{:?}", c.report);
    let local_port = c.local_port();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = observe(port, pki.path(), true);
        assert!(out.status.success(), "observe: {}", String::from_utf8_lossy(&out.stderr));
        let seen = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_default();
            v["flow"]["l4"]["TCP"]["source_port"] == local_port
                && v["flow"]["IP"]["destination"] == b.ip.to_string()
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pods' connection never reached the collector over mutual TLS; agent:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Mutual: a client without a certificate from the CA is refused.
    let refused = observe(port, pki.path(), false);
    assert!(!refused.status.success(), "a client without a certificate was served");
}
