//! `hopwatch`: eBPF network path observability — which hop is slow or failing.

#![expect(
    unused_crate_dependencies,
    reason = "the binary is the library's front end; the library target uses the dependencies"
)]

use std::process::ExitCode;

fn main() -> ExitCode {
    hopwatch::main()
}
