//! TLS and mutual TLS between agents, query clients and the collector, and the errors a bad
//! certificate gives. Uses the real server path (`collector::serve`) on an ephemeral loopback
//! port, since TLS is part of what is tested.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hopwatch_collector::serve;
use hopwatch_proto::{
    backoff::Backoff,
    observer::{GetFlowsRequest, ServerStatusRequest, observer_client::ObserverClient},
    tls::{ClientTls, ServerTlsArgs, Target, TlsError, explain},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::sink::{Batching, link, queue::Queue};

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA, a server certificate for localhost/127.0.0.1 and a client certificate signed by
    /// it, and a second, unrelated CA with its own client certificate.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, data: String| std::fs::write(dir.path().join(name), data).unwrap();
        for prefix in ["", "other-"] {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, format!("{prefix}hopwatch test CA"));
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            write(&format!("{prefix}ca.pem"), ca_cert.pem());
            let issuer = Issuer::new(ca_params, ca_key);
            for (name, sans) in [
                ("server", vec!["localhost".to_owned(), "127.0.0.1".to_owned()]),
                ("client", vec!["agent-1".to_owned()]),
            ] {
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::new(sans).unwrap();
                params.distinguished_name.push(DnType::CommonName, name);
                let cert = params.signed_by(&key, &issuer).unwrap();
                write(&format!("{prefix}{name}.pem"), cert.pem());
                write(&format!("{prefix}{name}-key.pem"), key.serialize_pem());
            }
        }
        Self { dir }
    }

    fn server(&self, mutual: bool) -> ServerTlsArgs {
        ServerTlsArgs {
            tls_cert: Some(self.path("server.pem")),
            tls_key: Some(self.path("server-key.pem")),
            tls_client_ca: mutual.then(|| self.path("ca.pem")),
            allow_plaintext: false,
        }
    }

    fn client(&self, ca: &str, identity: Option<&str>) -> ClientTls {
        ClientTls {
            ca: Some(self.path(ca)),
            cert: identity.map(|p| self.path(&format!("{p}.pem"))),
            key: identity.map(|p| self.path(&format!("{p}-key.pem"))),
            server_name: None,
            flags: hopwatch_proto::tls::ClientFlags::default(),
        }
    }
}

async fn start(pki: &Pki, mutual: bool) -> (Arc<Hub>, String, CancellationToken) {
    let hub = memory_hub(Duration::ZERO);
    let listen = "127.0.0.1:0".parse().unwrap();
    let cfg = pki.server(mutual).server_config(listen).unwrap();
    let stop = CancellationToken::new();
    let serving = serve(hub.clone(), listen, cfg, stop.clone()).await.unwrap();
    (hub, format!("https://localhost:{}", serving.addr.port()), stop)
}

/// Calls `ServerStatus`; returns the explained error on failure.
async fn status(url: &str, tls: &ClientTls) -> Result<u64, String> {
    let target = Target::parse(url, false).unwrap();
    let ep = target.endpoint(tls, false).map_err(|e| e.to_string())?;
    let ch = ep.connect().await.map_err(|e| explain(&e))?;
    let s = ObserverClient::new(ch)
        .server_status(ServerStatusRequest {})
        .await
        .map_err(|s| explain(&s))?;
    Ok(s.into_inner().seen_flows)
}

#[tokio::test]
async fn mutual_tls_carries_ingest_and_queries() {
    let pki = Pki::new();
    let (hub, url, stop) = start(&pki, true).await;
    // An agent with a client certificate streams over mutual TLS.
    let target = Target::parse(&url, false).unwrap();
    let endpoint = target.endpoint(&pki.client("ca.pem", Some("client")), false).unwrap();
    let queue = Arc::new(Queue::new(10_000, "tls-node"));
    let link_stop = CancellationToken::new();
    let hello = hopwatch_proto::hopwatch::v1::Hello {
        agent_id: "tls-agent".into(),
        node_name: "tls-node".into(),
        version: "test".into(),
        started: None,
    };
    let task = tokio::spawn(link::run_remote(
        queue.clone(),
        link::dial(endpoint),
        url.clone(),
        hello,
        Batching { max_events: 100, interval: Duration::from_millis(10) },
        Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(100) },
        link_stop.clone(),
    ));
    let t0 = now_ns() - SEC;
    for k in 0..500 {
        queue.offer(flow("tls-node", t0 + k, 443, Verdict::Forwarded));
    }
    for _ in 0..500 {
        if queue.is_drained() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queue.is_drained(), "flows delivered over mutual TLS");
    link_stop.cancel();
    task.await.unwrap();
    // A query client with a certificate reads them back.
    assert_eq!(status(&url, &pki.client("ca.pem", Some("client"))).await, Ok(500));
    let ch = Target::parse(&url, false)
        .unwrap()
        .endpoint(&pki.client("ca.pem", Some("client")), false)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let got = get_flows(ch, GetFlowsRequest::default()).await.unwrap();
    assert_eq!(flows(&got).len(), 500);
    let nodes = hub.nodes.nodes(0);
    assert!(nodes[0].tls.as_ref().unwrap().enabled, "the node is reported as connected over TLS");
    stop.cancel();
}

#[tokio::test]
async fn bad_certificates_give_one_clear_error() {
    let pki = Pki::new();
    let (_hub, url, stop) = start(&pki, true).await;
    // No client certificate on a mutual-TLS server.
    let err = status(&url, &pki.client("ca.pem", None)).await.unwrap_err();
    assert!(err.starts_with("the server requires a client certificate"), "{err}");
    // A client certificate from a CA the server does not trust.
    let err = status(&url, &pki.client("ca.pem", Some("other-client"))).await.unwrap_err();
    assert!(err.starts_with("the server rejected the client certificate"), "{err}");
    // The client does not trust the server's CA.
    let err = status(&url, &pki.client("other-ca.pem", Some("client"))).await.unwrap_err();
    assert!(err.starts_with("the server's certificate is not signed by the trusted CA"), "{err}");
    // The server's certificate does not name the host the client expects.
    let mut wrong_name = pki.client("ca.pem", Some("client"));
    wrong_name.server_name = Some("collector.example".into());
    let err = status(&url, &wrong_name).await.unwrap_err();
    assert!(err.starts_with("the server's certificate does not name this host"), "{err}");
    // Plaintext to a TLS server.
    let plain = url.replace("https://", "http://");
    let err = status(&plain, &ClientTls::default()).await.unwrap_err();
    assert!(
        err.starts_with("the server closed the connection during setup (if it uses TLS"),
        "{err}"
    );
    stop.cancel();
}

#[test]
fn certificate_files_are_checked_up_front() {
    let pki = Pki::new();
    let listen = "127.0.0.1:4245".parse().unwrap();
    let mut args = pki.server(false);
    args.tls_cert = Some(pki.path("missing.pem"));
    let err = args.server_config(listen).unwrap_err();
    assert!(matches!(err, TlsError::Read { flag: "--tls-cert", .. }), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    let mut args = pki.server(false);
    args.tls_key = Some(pki.path("client-key.pem"));
    let err = args.server_config(listen).unwrap_err();
    assert!(err.to_string().contains("does not belong to the certificate"), "{err}");

    std::fs::write(pki.path("garbage.pem"), "not a certificate").unwrap();
    let mut args = pki.server(false);
    args.tls_cert = Some(pki.path("garbage.pem"));
    let err = args.server_config(listen).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} (--tls-cert) holds no PEM certificate", pki.path("garbage.pem").display())
    );

    let mut client = pki.client("ca.pem", Some("client"));
    client.key = None;
    let err = client.config("localhost").unwrap_err();
    assert_eq!(err.to_string(), "--tls-cert needs --tls-key too");
    let err = ClientTls::default().config("localhost").unwrap_err();
    assert!(err.to_string().contains("--tls-ca"), "{err}");
}

#[test]
fn plaintext_only_on_loopback_unless_allowed() {
    let public: std::net::SocketAddr = "0.0.0.0:4245".parse().unwrap();
    let err = ServerTlsArgs::default().server_config(public).unwrap_err();
    assert!(matches!(err, TlsError::PlaintextListen { .. }));
    let allowed = ServerTlsArgs { allow_plaintext: true, ..Default::default() };
    assert!(allowed.server_config(public).unwrap().is_none());
    assert!(
        ServerTlsArgs::default()
            .server_config("127.0.0.1:4245".parse().unwrap())
            .unwrap()
            .is_none()
    );
    assert!(
        ServerTlsArgs::default().server_config("[::1]:4245".parse().unwrap()).unwrap().is_none()
    );

    let target = Target::parse("http://10.0.0.5:4245", false).unwrap();
    assert!(matches!(
        target.endpoint(&ClientTls::default(), false),
        Err(TlsError::PlaintextConnect { .. })
    ));
    assert!(target.endpoint(&ClientTls::default(), true).is_ok());
    for (s, uri, tls) in [
        ("localhost", "http://localhost:4245", false),
        ("collector:9000", "http://collector:9000", false),
        ("https://collector", "https://collector:4245", true),
        ("[::1]:4245", "http://[::1]:4245", false),
    ] {
        let t = Target::parse(s, false).unwrap();
        assert_eq!((t.uri.as_str(), t.tls), (uri, tls), "{s}");
    }
    assert_eq!(Target::parse("collector", true).unwrap().uri, "https://collector:4245");
    for bad in ["ftp://x", "host:99999", "http://", "a:b:c", "http://h/path"] {
        assert!(Target::parse(bad, false).is_err(), "{bad}");
    }
}
