//! The static endpoints file as a user meets it: a mistake stops the agent before anything is
//! loaded, with the file, line, column and field of the problem.

use std::process::Command;

use super::TempFile;
use crate::support::{agent::BIN, require_root};

fn refused(name: &str, contents: &str) -> String {
    let file = TempFile::new(name, contents);
    let out = Command::new(BIN)
        .args(["agent", "-o", "json", "--endpoints-file", file.path()])
        .output()
        .expect("run hopwatch");
    assert!(!out.status.success(), "the agent accepted {contents:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "no flow before the error");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains(file.path()), "the message names the file: {err}");
    err
}

#[test]
fn a_bad_endpoints_file_is_refused_with_line_and_field() {
    require_root();
    let err = refused(
        "bad-ip.yaml",
        "endpoints:\n  - name: billing-db\n    namespace: legacy\n    ips:\n      - 10.20.0.5\n      - 10.20.0.300\n",
    );
    assert!(
        err.contains("line 6")
            && err.contains("endpoints[0].ips[1]")
            && err.contains("10.20.0.300"),
        "{err}"
    );
    assert!(!err.contains("hooks"), "refused before loading the kernel programs: {err}");

    let err = refused(
        "typo.yaml",
        "endpoints:\n  - name: db\n    lables: {role: primary}\n    ips: [10.0.0.1]\n",
    );
    assert!(err.contains("line 3") && err.contains("lables"), "{err}");

    let err =
        refused("bad.json", "{\"endpoints\": [{\"name\": \"db\", \"ips\": [\"10.0.0.0/40\"]}]}");
    assert!(err.contains("line 1") && err.contains("endpoints[0].ips[0]"), "{err}");
}
