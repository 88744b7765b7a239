//! `hopwatch certs`: a certificate authority and the certificates mutual TLS between agents,
//! the collector and query clients needs, as PEM files and, with `--kubernetes-secrets`, as the
//! Kubernetes Secrets `deploy/kubernetes` mounts (the names and keys cert-manager's
//! Certificates in `deploy/kubernetes/cert-manager` produce too: `tls.crt`, `tls.key`,
//! `ca.crt`).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Names in the collector's certificate by default: its Service in `deploy/kubernetes` (in the
/// `hopwatch` namespace), and loopback.
const COLLECTOR_NAMES: &[&str] = &[
    "hopwatch-collector",
    "hopwatch-collector.hopwatch",
    "hopwatch-collector.hopwatch.svc",
    "hopwatch-collector.hopwatch.svc.cluster.local",
    "localhost",
    "127.0.0.1",
];

#[derive(Debug, Clone, clap::Args)]
pub(super) struct CertsArgs {
    /// Directory for the PEM files (created if missing; existing files are not overwritten).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// A DNS name or address in the collector's certificate (repeat for several) [default: the
    /// collector Service's names in the `hopwatch` namespace, localhost, 127.0.0.1].
    #[arg(long, value_name = "NAME")]
    pub collector_name: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
    /// Also write `secrets.yaml`: the Secrets `deploy/kubernetes` mounts, in this namespace
    /// (`kubectl apply -f DIR/secrets.yaml`).
    #[arg(long, value_name = "NAMESPACE")]
    pub kubernetes_secrets: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CertsError {
    #[error("cannot create {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists; remove it or pick another --out-dir (certificates are never overwritten)"
    )]
    Exists { path: PathBuf },
    #[error("cannot generate the {what} certificate: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// One certificate the command writes: file stem, Secret name, common name, and its use.
struct Leaf {
    stem: &'static str,
    secret: &'static str,
    common_name: &'static str,
    server: bool,
}

/// The collector (server and, for its own checks, client), every agent, and query clients
/// (`hopwatch observe`, `hubble observe`, Grafana).
const LEAVES: [Leaf; 3] = [
    Leaf {
        stem: "collector",
        secret: "hopwatch-collector-tls",
        common_name: "hopwatch-collector",
        server: true,
    },
    Leaf {
        stem: "agent",
        secret: "hopwatch-agent-tls",
        common_name: "hopwatch-agent",
        server: false,
    },
    Leaf {
        stem: "client",
        secret: "hopwatch-client-tls",
        common_name: "hopwatch-client",
        server: false,
    },
];

/// `hopwatch certs`.
pub(super) fn run(args: &CertsArgs) -> Result<(), CertsError> {
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir)
        .map_err(|source| CertsError::Write { path: dir.clone(), source })?;
    let mut files = vec!["ca.crt".to_owned(), "ca.key".to_owned()];
    for l in &LEAVES {
        files.extend([format!("{}.crt", l.stem), format!("{}.key", l.stem)]);
    }
    if args.kubernetes_secrets.is_some() {
        files.push("secrets.yaml".to_owned());
    }
    if let Some(path) = files.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
        return Err(CertsError::Exists { path });
    }

    let days = i64::from(args.days);
    let gen_err = |what| move |source| CertsError::Generate { what, source };
    let ca_key = KeyPair::generate().map_err(gen_err("CA"))?;
    let mut ca = params(Vec::new(), days).map_err(gen_err("CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name.push(DnType::CommonName, "hopwatch CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("CA"))?;
    let ca_pem = ca_cert.pem();
    write(dir, "ca.crt", &ca_pem)?;
    write(dir, "ca.key", &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let collector_names: Vec<String> = if args.collector_name.is_empty() {
        COLLECTOR_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.collector_name.clone()
    };
    let mut secrets = String::new();
    for leaf in &LEAVES {
        let names =
            if leaf.server { collector_names.clone() } else { vec![leaf.common_name.into()] };
        let key = KeyPair::generate().map_err(gen_err(leaf.stem))?;
        let mut p = params(names, days).map_err(gen_err(leaf.stem))?;
        p.distinguished_name.push(DnType::CommonName, leaf.common_name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = if leaf.server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = p.signed_by(&key, &issuer).map_err(gen_err(leaf.stem))?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        write(dir, &format!("{}.crt", leaf.stem), &cert_pem)?;
        write(dir, &format!("{}.key", leaf.stem), &key_pem)?;
        if let Some(ns) = &args.kubernetes_secrets {
            secrets.push_str(&secret(leaf.secret, ns, &cert_pem, &key_pem, &ca_pem));
        }
    }
    if args.kubernetes_secrets.is_some() {
        write(dir, "secrets.yaml", &secrets)?;
    }
    eprintln!(
        "hopwatch certs: CA, collector ({}), agent and client certificates in {}{}",
        collector_names.join(", "),
        dir.display(),
        if args.kubernetes_secrets.is_some() { ", Secrets in secrets.yaml" } else { "" }
    );
    Ok(())
}

fn params(names: Vec<String>, days: i64) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(names)?;
    let now = std::time::SystemTime::now();
    p.not_before = now.into();
    p.not_after =
        (now + std::time::Duration::from_secs(u64::try_from(days).unwrap_or(1) * 86_400)).into();
    Ok(p)
}

/// Writes `name` in `dir`, readable by its owner only when it holds a key.
fn write(dir: &Path, name: &str, text: &str) -> Result<(), CertsError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let path = dir.join(name);
    let private = Path::new(name).extension().is_some_and(|e| e == "key") || name == "secrets.yaml";
    let mode = if private { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| CertsError::Write { path, source })
}

/// A `kubernetes.io/tls` Secret with the CA beside the pair, as cert-manager writes them.
fn secret(name: &str, namespace: &str, cert: &str, key: &str, ca: &str) -> String {
    let mut s = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/name: hopwatch\ntype: kubernetes.io/tls\nstringData:\n"
    );
    for (k, v) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)] {
        let _ = writeln!(s, "  {k}: |");
        for line in v.lines() {
            let _ = writeln!(s, "    {line}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_three_leaves_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let args = CertsArgs {
            out_dir: dir.path().join("pki"),
            collector_name: Vec::new(),
            days: 30,
            kubernetes_secrets: Some("hopwatch".into()),
        };
        run(&args).unwrap();
        for f in ["ca.crt", "collector.crt", "collector.key", "agent.crt", "client.key"] {
            let text = std::fs::read_to_string(args.out_dir.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}: {text}");
        }
        let secrets = std::fs::read_to_string(args.out_dir.join("secrets.yaml")).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&secrets).unwrap();
        let names: Vec<&str> = docs.iter().filter_map(|d| d["metadata"]["name"].as_str()).collect();
        assert_eq!(names, ["hopwatch-collector-tls", "hopwatch-agent-tls", "hopwatch-client-tls"]);
        for d in &docs {
            assert_eq!(d["type"], "kubernetes.io/tls");
            for k in ["tls.crt", "tls.key", "ca.crt"] {
                assert!(d["stringData"][k].as_str().is_some_and(|v| v.starts_with("-----BEGIN ")));
            }
        }
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains("ca.crt exists"), "{err}");
    }
}
