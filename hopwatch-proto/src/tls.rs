//! TLS and mutual TLS (rustls) for the collector's gRPC server and its clients (agents, the
//! `observe` CLI).
//!
//! Certificates and keys are read and checked up front (files exist, hold PEM, the key belongs to
//! the certificate), so a mistake is one sentence naming the file and the flag, not a handshake
//! failure later. Handshake failures are translated the same way ([`explain`]). Plaintext is
//! refused except on loopback unless the operator says `--allow-plaintext`.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use rustls::{RootCertStore, crypto::ring::default_provider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {} ({flag}): {source}", path.display())]
    Read {
        what: &'static str,
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} ({flag}) holds no PEM {what}", path.display())]
    NoPem { what: &'static str, flag: &'static str, path: PathBuf },
    #[error("the private key {} does not belong to the certificate {}: {reason}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
    #[error("{} ({flag}) is not a usable CA certificate: {reason}", path.display())]
    BadCa { flag: &'static str, path: PathBuf, reason: String },
    #[error("{flag} needs {needs} too")]
    Incomplete { flag: &'static str, needs: &'static str },
    #[error(
        "refusing plaintext on {addr}: it is not a loopback address; give a certificate \
         (--tls-cert/--tls-key) or pass --allow-plaintext"
    )]
    PlaintextListen { addr: SocketAddr },
    #[error(
        "refusing plaintext to {host}: it is not a loopback address; use https:// (or --tls) or \
         pass --allow-plaintext"
    )]
    PlaintextConnect { host: String },
    #[error("TLS needs the CA certificate that signed the server's certificate ({flag})")]
    NoCa { flag: &'static str },
    #[error("invalid server address {server:?}: {reason}")]
    BadServer { server: String, reason: String },
}

/// Server side: `--tls-cert`/`--tls-key` enable TLS, `--tls-client-ca` requires client
/// certificates signed by that CA (mutual TLS).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Server certificate (PEM, with its chain) for TLS on the listen address.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS for agents and query
    /// clients.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (only on a trusted network).
    #[arg(long)]
    pub allow_plaintext: bool,
}

fn read_certs(
    path: &Path,
    what: &'static str,
    flag: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        flag,
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem { what, flag, path: path.to_owned() });
    }
    Ok(certs)
}

fn read_key(path: &Path, flag: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        flag,
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoPem {
        what,
        flag,
        path: path.to_owned(),
    })
}

/// Reads a certificate and its key and checks that they belong together.
fn identity(
    cert: &Path,
    key: &Path,
    cert_flag: &'static str,
    key_flag: &'static str,
) -> Result<Identity, TlsError> {
    let chain = read_certs(cert, "certificate", cert_flag)?;
    let der_key = read_key(key, key_flag)?;
    CertifiedKey::from_der(chain, der_key, &default_provider()).map_err(|e| {
        TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned(), reason: e.to_string() }
    })?;
    let pem = |p: &Path| std::fs::read(p).expect("read a moment ago");
    Ok(Identity::from_pem(pem(cert), pem(key)))
}

fn ca(path: &Path, flag: &'static str) -> Result<Certificate, TlsError> {
    let certs = read_certs(path, "CA certificate", flag)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::BadCa {
            flag,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Certificate::from_pem(std::fs::read(path).map_err(|source| TlsError::Read {
        what: "CA certificate",
        flag,
        path: path.to_owned(),
        source,
    })?))
}

impl ServerTlsArgs {
    /// The server's TLS configuration (`None`: plaintext, allowed on loopback or when asked).
    pub fn server_config(&self, listen: SocketAddr) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            if let Some(_ca) = &self.tls_client_ca {
                return Err(TlsError::Incomplete {
                    flag: "--tls-client-ca",
                    needs: "--tls-cert and --tls-key",
                });
            }
            if !listen.ip().is_loopback() && !self.allow_plaintext {
                return Err(TlsError::PlaintextListen { addr: listen });
            }
            return Ok(None);
        };
        let mut cfg =
            ServerTlsConfig::new().identity(identity(cert, key, "--tls-cert", "--tls-key")?);
        if let Some(path) = &self.tls_client_ca {
            cfg = cfg.client_ca_root(ca(path, "--tls-client-ca")?);
        }
        Ok(Some(cfg))
    }
}

/// Client side: a CA to verify the server, optionally a client identity for mutual TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
    /// Flag names to use in messages (they differ between `agent` and `observe`).
    pub flags: ClientFlags,
}

#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

impl Default for ClientFlags {
    fn default() -> Self {
        Self { ca: "--tls-ca", cert: "--tls-cert", key: "--tls-key" }
    }
}

impl ClientTls {
    pub fn config(&self, host: &str) -> Result<ClientTlsConfig, TlsError> {
        let mut cfg = ClientTlsConfig::new()
            .domain_name(self.server_name.clone().unwrap_or_else(|| host.to_owned()));
        // No system roots: a collector's certificate comes from the operator's own CA.
        let path = self.ca.as_ref().ok_or(TlsError::NoCa { flag: self.flags.ca })?;
        cfg = cfg.ca_certificate(ca(path, self.flags.ca)?);
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                cfg = cfg.identity(identity(c, k, self.flags.cert, self.flags.key)?);
            }
            (Some(_), None) => {
                return Err(TlsError::Incomplete { flag: self.flags.cert, needs: self.flags.key });
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete { flag: self.flags.key, needs: self.flags.cert });
            }
            (None, None) => {}
        }
        Ok(cfg)
    }
}

/// Where a client connects: `host:port`, `http://host:port` or `https://host:port` (the port
/// defaults to 4245).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub uri: String,
    pub host: String,
    pub tls: bool,
}

impl Target {
    /// `tls` forces TLS for an address without a scheme.
    pub fn parse(server: &str, tls: bool) -> Result<Self, TlsError> {
        let bad = |reason: &str| TlsError::BadServer {
            server: server.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme_tls, rest) = if let Some(r) = server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = server.strip_prefix("http://") {
            if tls {
                return Err(bad("http:// cannot be combined with TLS options; use https://"));
            }
            (false, r)
        } else if server.contains("://") {
            return Err(bad("the scheme must be http:// or https://"));
        } else {
            (tls, server)
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(bad("expected host:port"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in an IPv6 address"))?;
            (format!("[{h}]"), p.strip_prefix(':'))
        } else if rest.matches(':').count() > 1 {
            return Err(bad("write IPv6 addresses as [addr]:port"));
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("empty host"));
        }
        let port: u16 = match port {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            None => crate::DEFAULT_PORT,
        };
        let scheme = if scheme_tls { "https" } else { "http" };
        Ok(Self {
            uri: format!("{scheme}://{host}:{port}"),
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            tls: scheme_tls,
        })
    }

    /// A gRPC endpoint for this target: TLS with `tls` when the target is TLS, plaintext only to
    /// loopback unless allowed.
    pub fn endpoint(
        &self,
        tls: &ClientTls,
        allow_plaintext: bool,
    ) -> Result<tonic::transport::Endpoint, TlsError> {
        let mut ep = tonic::transport::Endpoint::from_shared(self.uri.clone())
            .map_err(|e| TlsError::BadServer { server: self.uri.clone(), reason: e.to_string() })?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(20))
            .keep_alive_timeout(std::time::Duration::from_secs(20));
        if self.tls {
            ep = ep.tls_config(tls.config(&self.host)?).map_err(|e| TlsError::BadServer {
                server: self.uri.clone(),
                reason: e.to_string(),
            })?;
        } else {
            check_plaintext_connect(&self.host, allow_plaintext)?;
        }
        Ok(ep)
    }
}

/// Whether `host` (a name or address, without port) is this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses plaintext to a non-loopback host unless allowed.
pub fn check_plaintext_connect(host: &str, allow: bool) -> Result<(), TlsError> {
    if allow || is_loopback_host(host) {
        Ok(())
    } else {
        Err(TlsError::PlaintextConnect { host: host.to_owned() })
    }
}

/// One sentence for a failed connection or call: what went wrong in words an operator can act
/// on, with the underlying cause at the end.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        // A Status prints its code, message and source all at once; take just the message.
        let s = e
            .downcast_ref::<tonic::Status>()
            .map_or_else(|| e.to_string(), |st| st.message().to_owned());
        if !chain.iter().any(|c: &String| c.contains(&s)) {
            chain.push(s);
        }
        cur = e.source();
    }
    let all = chain.join(": ");
    let has = |needle: &str| all.contains(needle);
    let hint = if has("UnknownIssuer") {
        "the server's certificate is not signed by the trusted CA (check the CA file)"
    } else if has("NotValidForName") || has("not valid for name") {
        "the server's certificate does not name this host (set the expected server name)"
    } else if has("Expired") || has("certificate expired") {
        "a certificate has expired"
    } else if has("CertificateRequired") || has("certificate required") {
        "the server requires a client certificate (mutual TLS): give a client certificate and key"
    } else if has("UnknownCA")
        || has("BadCertificate")
        || has("unknown ca")
        || has("bad certificate")
    {
        "the server rejected the client certificate (not signed by the CA it trusts)"
    } else if has("InvalidContentType") || has("corrupt message") || has("CorruptMessage") {
        "the server does not speak TLS here (plaintext server? use http://)"
    } else if has("frame with invalid size") || has("http2 error") && has("HTTP/1") {
        "the server speaks TLS (use https:// or --tls)"
    } else if has("broken pipe") || has("connection reset") || has("Connection reset") {
        "the server closed the connection during setup (if it uses TLS, connect with https:// or --tls)"
    } else if has("Connection refused") {
        "connection refused: nothing listens there"
    } else if has("dns error") || has("failed to lookup address") {
        "cannot resolve the server's name"
    } else if has("deadline has elapsed") || has("timed out") {
        "timed out"
    } else {
        return all;
    };
    format!("{hint} ({all})")
}
