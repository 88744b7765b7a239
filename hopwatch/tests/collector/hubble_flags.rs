//! Every `hubble observe` flag `hopwatch observe` supports (the README's table), against flows
//! stored in a collector process and against the same flows recorded to a file and read back
//! with `--input-file`: what each selects, how repetition ORs and different flags AND, `--not`,
//! the allow/deny lists, the printers' flags, and the Cilium-only flags' refusals.

use std::{sync::Arc, time::Duration};

use hopwatch::harness::Queue;
use tokio_util::sync::CancellationToken;

use super::{flag_cases::*, link_to, support::*, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::too_many_lines, reason = "one scenario, checked flag by flag")]
async fn every_supported_hubble_flag_selects_the_same_flows_from_a_collector_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(free_port(), dir.path(), &[]);
    let url = collector.url();
    let queue = Arc::new(Queue::new(1000, "n1"));
    let stop = CancellationToken::new();
    let link = link_to(&url, "n1", &queue, &stop);
    let t0 = now_ns() - 60_000_000_000;
    for f in hubble_flag_flows(t0) {
        queue.offer(f);
    }
    wait_until("flows stored", Duration::from_secs(30), async || {
        queue.is_drained() && status(&url).await.is_some_and(|s| s.num_flows == 3)
    })
    .await;
    let server = ["--server".to_owned(), format!("127.0.0.1:{}", collector.port)];

    // The recording: what `observe -o json` printed, replayed through --input-file; a line of
    // Hubble's own output (a Cilium drop reason, an interface name) and a garbage line added.
    let (code, recorded, err) =
        run(&[&server[..], &["-o".into(), "json".into(), "--all".into()]].concat(), None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(uuids(&recorded), ["tcp-web", "http-api", "drop"]);
    let hubble_line = r#"{"flow":{"time":"2026-11-23T16:00:00.5Z","uuid":"hubble-drop","verdict":"DROPPED","drop_reason_desc":"POLICY_DENIED","IP":{"source":"10.0.2.1","destination":"10.0.2.2","ipVersion":"IPv4"},"source":{"namespace":"kube-system","pod_name":"coredns-1","identity":102},"node_name":"k8s1","node_labels":["zone=c"],"interface":{"index":7,"name":"eth0"},"trace_observation_point":"TO_ENDPOINT","Summary":"policy"},"node_name":"k8s1","time":"2026-11-23T16:00:00.5Z"}"#;
    let file = dir.path().join("recorded.json");
    std::fs::write(&file, format!("{recorded}not a flow\n{hubble_line}\n")).unwrap();
    let from_file = ["--input-file".to_owned(), file.display().to_string()];

    for (args, want, hubble) in cases() {
        let json = ["-o".to_owned(), "json".to_owned()];
        let (code, out, err) = run(&[&server[..], &args, &json, &["--all".into()]].concat(), None);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(uuids(&out), want, "collector: {args:?}");
        // The file: the same selection, and the Hubble line when it matches.
        let (code, out, err) = run(&[&from_file[..], &args, &json, &["-s".into()]].concat(), None);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "--silent-errors: {err}");
        let mut want_file: Vec<&str> = want.clone();
        if hubble {
            want_file.push("hubble-drop");
        }
        assert_eq!(uuids(&out), want_file, "file: {args:?}");
    }
    // A CEL expression outside the supported subset is refused before any call.
    let (code, _, err) =
        run(&[&server[..], &["--cel-expression".into(), "_flow.nope == 1".into()]].concat(), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--cel-expression") && err.contains("has no field nope"), "{err}");

    // The Hubble line on its own: its Cilium drop reason, interface name and node labels.
    for (args, want) in [
        (&["--drop-reason-desc", "POLICY_DENIED"][..], &["hubble-drop"][..]),
        (&["--allowlist", r#"{"drop_reason_desc":["POLICY_DENIED"]}"#], &["hubble-drop"]),
        (&["--interface", "eth0"], &["hubble-drop"]),
        (&["--node-label", "zone=c"], &["hubble-drop"]),
        (&["--pod", "kube-system/coredns"], &["hubble-drop"]),
    ] {
        let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
        let (code, out, err) = run(
            &[&["--input-file".into(), "-".into(), "-o".into(), "json".into()], &args[..]].concat(),
            Some(&format!("{recorded}{hubble_line}\n")),
        );
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(uuids(&out), want, "stdin: {args:?}");
    }
    // Without --silent-errors the skipped line is named.
    let (code, _, err) = run(&[&from_file[..], &["--ipv6".into()]].concat(), None);
    assert_eq!(code, Some(0));
    assert!(err.contains("line 4") && err.contains("skipped"), "{err}");
    // --first/--last over a file.
    let (_, out, _) = run(
        &[&from_file[..], &["-s", "--first", "1", "-o", "json"].map(String::from)].concat(),
        None,
    );
    assert_eq!(uuids(&out), ["tcp-web"]);
    let (_, out, _) = run(
        &[&from_file[..], &["-s", "--last", "2", "-o", "json"].map(String::from)].concat(),
        None,
    );
    assert_eq!(uuids(&out), ["drop", "hubble-drop"]);

    // --numeric: addresses instead of pod names.
    let compact = |extra: &[&str]| {
        let extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        let (code, out, err) = run(&[&server[..], &["--all".into()], &extra[..]].concat(), None);
        assert_eq!(code, Some(0), "{err}");
        out
    };
    let named = compact(&["--to-port", "5432"]);
    assert!(named.contains("prod/web-7d9f:40000 -> prod/postgres-0:5432"), "{named}");
    let numeric = compact(&["--to-port", "5432", "--numeric"]);
    assert!(numeric.contains("10.0.0.1:40000 -> 10.0.1.2:5432"), "{numeric}");
    // --use-default-field-masks: the default mask keeps everything the printers read.
    for format in ["compact", "dict", "table"] {
        let masked = compact(&["-o", format]);
        let full = compact(&["-o", format, "--use-default-field-masks=false"]);
        assert_eq!(masked, full, "{format}");
        assert!(full.contains("NETFILTER_DROP at nft_do_chain+0x3c4"), "{full}");
    }
    // --field-mask: only the named fields (JSON output only).
    let (code, out, err) = run(
        &[
            &server[..],
            &["--all", "-o", "json", "--field-mask", "uuid,verdict,source.pod_name"]
                .map(String::from),
        ]
        .concat(),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["flow"],
        serde_json::json!({"uuid": "tcp-web", "verdict": "FORWARDED", "source": {"pod_name": "web-7d9f"}})
    );
    for (args, needle) in [
        (&["--field-mask", "time"][..], "--field-mask needs -o json"),
        (&["-o", "json", "--field-mask", "nope"], "\"nope\" is not a flow field"),
    ] {
        let (code, _, err) = run(
            &[&server[..], &args.iter().map(|&a| a.to_owned()).collect::<Vec<_>>()].concat(),
            None,
        );
        assert_eq!(code, Some(2), "{args:?}");
        assert!(err.contains(needle), "{err}");
    }

    // --print-raw-filters: Hubble's YAML, no call made (the server is unreachable).
    let (code, out, err) = run(
        &[
            "--server",
            "127.0.0.1:1",
            "--print-raw-filters",
            "--http-method",
            "get",
            "-A",
            "--not",
            "--drop-reason-desc",
            "NO_SOCKET",
        ]
        .map(String::from),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "allowlist:\n    - '{\"source_pod\":[\"/\"],\"http_method\":[\"get\"]}'\n    - '{\"destination_pod\":[\"/\"],\"http_method\":[\"get\"]}'\ndenylist:\n    - '{\"kernel_drop_reason\":[\"NO_SOCKET\"]}'\n"
    );

    // Cilium-only flags: one line saying why, exit 2, before any call.
    for flag in [
        "--identity=5",
        "--from-identity=5",
        "--to-identity=5",
        "--cluster=c",
        "--from-cluster=c",
        "--to-cluster=c",
        "--encrypted",
        "--unencrypted",
        "--snat-ip=1.1.1.1",
        "--ip-trace-id=1",
        "--ip-translation=false",
        "--print-policy-names",
        "--port-forward",
        "--port-forward-port=4245",
        "--kube-context=x",
        "--kubeconfig=x",
        "--kube-namespace=x",
        "--tls-allow-insecure",
        "--basic-auth-username=u",
        "--basic-auth-password=p",
        "--request-timeout=5s",
        "--config=x",
        "--debug",
    ] {
        let (code, out, err) = run(&[flag.to_owned()], None);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(out.is_empty());
        let name = flag.split('=').next().unwrap();
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.contains(&format!("{name} is not supported: ")), "{flag}: {err}");
    }
    stop.cancel();
    link.await.unwrap();
}
