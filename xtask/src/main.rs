//! `cargo xtask`: set up what hopwatch needs on a fresh Debian machine, build, run, test.
//!
//! Every step says what it is doing and why; nothing is installed that is already there.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod stages;
mod vm;

/// LLVM major version of the nightly rustc that builds the kernel programs; bpf-linker must be
/// built against the same one.
const LLVM_MAJOR: &str = "22";
/// bpf-linker version known to work with that LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where llvm-sys (for LLVM 22.1) looks for LLVM.
const LLVM_SYS_PREFIX_VAR: &str = "LLVM_SYS_221_PREFIX";

/// Debian packages the build needs (bpf-linker links against LLVM 22).
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
/// Debian packages the end-to-end tests need: namespaces and veth (iproute2), firewall rules
/// (iptables, nftables), peer processes (python3), dropping privileges (util-linux's setpriv);
/// the application-protocol topology's servers (nginx, postgresql, redis-server,
/// mariadb-server, dnsmasq-base: the binary without Debian's system-wide service) and tools
/// (openssl for the test certificate, curl as the client, dig to see dnsmasq answer,
/// python3-venv for the app's and the compatibility test's virtualenvs); the metrics test's Prometheus server with promtool
/// (prometheus); systemd for `systemd-analyze verify` of the unit in deploy/; the web UI test's
/// browser (chromium, driven by playwright-core from npm, see [`ui_npm`]); the collector's
/// ClickHouse tests' server (clickhouse-server, Debian's 18.16; the tests start private instances
/// on loopback, never the system-wide one) and, for its 2-shard cluster test, ZooKeeper
/// (zookeeper, run by the test with openjdk-17-jre-headless's java).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "python3",
    "util-linux",
    "nginx",
    "postgresql",
    "redis-server",
    "mariadb-server",
    "dnsmasq-base",
    "openssl",
    "curl",
    "bind9-dnsutils",
    "python3-venv",
    "prometheus",
    "systemd",
    "chromium",
    "clickhouse-server",
    "zookeeper",
    "openjdk-17-jre-headless",
];
/// End-to-end tests run a second time with the agent on the syscall capture path: every
/// application protocol, TLS, DNS, errors the servers send before any request, and request
/// tracing (thread causality from the syscall tracepoints).
const SYSCALL_PATH_TESTS: &[&str] = &[
    "l7::",
    "server_errors::",
    "tcp::",
    "tls_handshake::",
    "tracing::",
    // TLS connections are promoted to the exchange engine on this path too.
    "exchange_engine::over_tls",
];
/// The end-to-end tests' Python packages, and the virtualenv they go into.
const E2E_REQUIREMENTS: &str = "hopwatch/tests/e2e/requirements.txt";
const E2E_VENV: &str = "target/e2e-venv";
/// Debian's hook that tells maintainer scripts whether they may start services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// The compatibility test's Python packages (a second gRPC toolchain, and chdb-core: a modern
/// ClickHouse in process for the collector's ClickHouse DDL and queries) and where they go.
const COMPAT_REQUIREMENTS: &str = "hopwatch/tests/compat/requirements.txt";
const COMPAT_VENV: &str = "target/compat-venv";
/// A real OTLP trace receiver with a query API (Arize Phoenix) for the trace export test, in a
/// virtualenv of its own (its web stack pins differ from the test app's).
const OTLP_REQUIREMENTS: &str = "hopwatch/tests/e2e/otlp-requirements.txt";
const OTLP_VENV: &str = "target/otlp-venv";
/// The web UI's npm packages (package.json, package-lock.json): the graph library it embeds
/// (vendored, see `ui-vendor`) and the browser test's driver.
const UI_DIR: &str = "hopwatch/ui";
/// What `ui-vendor` copies from node_modules into the UI's vendor/ dir (embedded in the binary).
const UI_VENDORED: &[(&str, &str)] = &[
    ("node_modules/cytoscape/dist/cytoscape.min.js", "vendor/cytoscape/cytoscape.min.js"),
    ("node_modules/cytoscape/LICENSE", "vendor/cytoscape/LICENSE"),
];

#[derive(Parser)]
#[command(name = "xtask", about = "hopwatch's set-up, build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building hopwatch needs (nightly + rust-src, LLVM 22, bpf-linker) and mount
    /// tracefs.
    Setup,
    /// Set up if needed, then build hopwatch (kernel programs embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build, and run `hopwatch agent` on this host (root required).
    Run {
        /// Arguments for `hopwatch agent`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up if needed (test packages too), then run the unit tests and the privileged
    /// end-to-end tests (serially, as root).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Seconds each fuzz target runs after the tests (0: no fuzzing).
        #[arg(long, default_value_t = 10)]
        fuzz_seconds: u32,
        /// Skip the VM stage (the agent on Debian 12's own kernel under qemu; see `vm-test`). It
        /// is also skipped when a test filter is given.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for the end-to-end test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        filter: Vec<String>,
    },
    /// Boot Debian's own kernel (Debian 12's 6.1 by default) under qemu with a minimal
    /// initramfs and check the release agent there against injected truth: connect latency
    /// (netem), bytes, a refused connect, a netfilter drop, L7 capture reported unavailable, no
    /// programs left after SIGKILL. Installs qemu and downloads the kernel package with apt.
    VmTest {
        /// Debian kernel ABI, e.g. `6.1.0-47` [default: what `linux-image-amd64` depends on].
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
    },
    /// Run each cargo-fuzz target (`<crate>/fuzz`: protocol parsers, kernel event decoding,
    /// collector ingest) for a bounded time, after replaying the inputs that once crashed it;
    /// installs cargo-fuzz if needed.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets to run [default: all].
        targets: Vec<String>,
    },
    /// Measure every issue-7 figure in one run (root for all but `hops` and `collector`): the
    /// data path with the agent off / TCP capture / full L7 (wrk HTTP, HTTPS, connection churn;
    /// pgbench), the agent's CPU per event, the userspace pipeline on one core, the agent's
    /// memory, the collector; prints one table and writes BENCHMARKS.md.
    Bench {
        /// Only these groups (comma-separated): `hops` (aggregation and /metrics), `collector`
        /// (ingest, queries, event-to-observe delay), `clickhouse` (the collector's ClickHouse
        /// writes, a rare-filter query over 10M stored flows, bytes per flow), `datapath` (loads with the agent off / TCP /
        /// L7, agent CPU per event; root), `pipeline` (recorded events replayed on one core;
        /// root), `memory` (RSS idle, with many connections open, after many short ones; root),
        /// `asyncio` (a FastAPI app on uvicorn with and without the asyncio probes; root),
        /// `vm` (the agent's cost on Debian 12's 6.1 kernel under qemu). All by default.
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = ["hops", "collector", "clickhouse", "datapath", "pipeline", "memory", "asyncio", "vm"]
        )]
        only: Vec<String>,
        /// Rounds over all modes (medians are reported, with the lowest and highest round).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Seconds of load per mode per round.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Concurrent wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Concurrent connections held open for the memory figure.
        #[arg(long, default_value_t = 100_000)]
        hold_conns: u64,
        /// Short-lived connections for the memory figure (stopped after 150 s if not done).
        #[arg(long, default_value_t = 1_000_000)]
        churn_conns: u64,
        /// An argument for the collector benchmark binary (e.g. `--collector-arg=--flows=200000`).
        #[arg(long = "collector-arg", allow_hyphen_values = true)]
        collector_args: Vec<String>,
        /// An argument for the ClickHouse benchmark binary (e.g.
        /// `--clickhouse-arg=--flows --clickhouse-arg=2000000`).
        #[arg(long = "clickhouse-arg", allow_hyphen_values = true)]
        clickhouse_args: Vec<String>,
        /// Where the report goes, relative to the workspace root.
        #[arg(long, default_value = "BENCHMARKS.md")]
        output: PathBuf,
        /// Also profile the agent (`perf record -g`) during one extra full-L7 run of the first
        /// data path load; its hottest functions go into the report.
        #[arg(long)]
        profile: bool,
    },
    /// Install the web UI's npm packages (exact versions from hopwatch/ui/package-lock.json)
    /// and copy the graph library's build and licence into hopwatch/ui/vendor/, which the
    /// binary embeds; run after changing a version in package.json (`npm install` there first
    /// to update the lock file).
    UiVendor,
    /// Install what the tests need (the Debian test packages, services held back; the Python
    /// virtualenvs: the end-to-end tests', Phoenix for the OTLP test, grpcio-tools and chdb-core
    /// for the compatibility and ClickHouse tests) without running anything: for running one
    /// test target by hand, e.g. `cargo test -p hopwatch --test collector clickhouse`.
    TestSetup,
    /// Connections for the memory benchmark, run by `bench` inside its namespace.
    #[command(hide = true)]
    BenchConns(bench::conns::ConnsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cargo_bin_on_path();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(&[]),
        Task::TestSetup => {
            setup(TEST_PACKAGES)?;
            python_venv(E2E_REQUIREMENTS, E2E_VENV)?;
            python_venv(OTLP_REQUIREMENTS, OTLP_VENV)?;
            python_venv(COMPAT_REQUIREMENTS, COMPAT_VENV)
        }
        Task::Build { release } => {
            setup(&[])?;
            build(release)
        }
        Task::Run { args } => {
            setup(&[])?;
            build(true)?;
            if !is_root() {
                bail!(
                    "hopwatch agent loads eBPF programs and needs root: run `sudo -E cargo xtask run`"
                );
            }
            let bin = workspace_root().join("target/release/hopwatch");
            say(&format!("running {} agent {}", bin.display(), args.join(" ")));
            let err = exec(Command::new(&bin).arg("agent").args(&args));
            Err(err).with_context(|| format!("cannot execute {}", bin.display()))
        }
        Task::Bench {
            only,
            rounds,
            seconds,
            connections,
            hold_conns,
            churn_conns,
            collector_args,
            clickhouse_args,
            output,
            profile,
        } => {
            // The agent crate's build embeds the kernel object: the toolchain first.
            setup(&[])?;
            let command = std::iter::once("cargo xtask".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ");
            bench::run(&bench::BenchOptions {
                only,
                rounds,
                seconds,
                connections,
                collector_args,
                clickhouse_args,
                hold_conns,
                churn_conns,
                output,
                command,
                profile,
            })
        }
        Task::BenchConns(args) => bench::conns::main(&args),
        Task::UiVendor => {
            ui_npm()?;
            let ui = workspace_root().join(UI_DIR);
            for (from, to) in UI_VENDORED {
                say(&format!("{UI_DIR}/{from} -> {UI_DIR}/{to}"));
                std::fs::copy(ui.join(from), ui.join(to))
                    .with_context(|| format!("cannot copy {from} to {to} in {UI_DIR}"))?;
            }
            Ok(())
        }
        Task::Fuzz { seconds, targets } => {
            setup(&[])?;
            fuzz::run(&fuzz::FuzzOptions { seconds, targets: &targets })
        }
        Task::VmTest { kernel } => {
            setup(&[])?;
            if !is_root() {
                bail!(
                    "the VM test installs packages and runs qemu: run `sudo -E cargo xtask vm-test`"
                );
            }
            build(true)?;
            vm::run(&vm::VmOptions { kernel })
        }
        Task::Test { unit, fuzz_seconds, no_vm, filter } => {
            setup(if unit { &[] } else { TEST_PACKAGES })?;
            if !unit {
                python_venv(E2E_REQUIREMENTS, E2E_VENV)?;
                python_venv(OTLP_REQUIREMENTS, OTLP_VENV)?;
                ui_npm()?;
                ui_vendored_current()?;
            }
            say("unit tests");
            // Default members: everything but the kernel crate, which only builds for the BPF target.
            cargo(&["test", "--lib", "--bins"])?;
            if unit {
                return Ok(());
            }
            if !is_root() {
                bail!(
                    "the end-to-end tests load eBPF programs and create network namespaces: run \
                     `sudo -E cargo xtask test` (or `cargo xtask test --unit` for unit tests only)"
                );
            }
            python_venv(COMPAT_REQUIREMENTS, COMPAT_VENV)?;
            say(
                "collector and compatibility tests (collector processes, a real agent, a Python gRPC client)",
            );
            stages::within(
                stages::COLLECTOR_STAGE_LIMIT,
                Command::new(env!("CARGO")).current_dir(workspace_root()).args([
                    "test",
                    "-p",
                    "hopwatch",
                    "--test",
                    "collector",
                    "--test",
                    "compat",
                    "--",
                    "--test-threads=1",
                ]),
            )?;
            say("privileged end-to-end tests (serial)");
            let mut args =
                vec!["test", "-p", "hopwatch", "--test", "e2e", "--", "--test-threads=1"];
            args.extend(filter.iter().map(String::as_str));
            stages::within(
                stages::E2E_STAGE_LIMIT,
                Command::new(env!("CARGO")).current_dir(workspace_root()).args(&args),
            )?;
            if filter.is_empty() {
                say("the application-protocol tests again through the syscall capture path (how \
                     kernels before 6.3 are served), forced with --l7-hook syscalls, and with \
                     the TLS uprobes on OpenSSL's exported functions");
                let mut args = vec!["test", "-p", "hopwatch", "--test", "e2e", "--"];
                args.extend(SYSCALL_PATH_TESTS);
                args.push("--test-threads=1");
                stages::within(
                    stages::SYSCALL_STAGE_LIMIT,
                    Command::new(env!("CARGO"))
                        .args(&args)
                        .current_dir(workspace_root())
                        .env("HOPWATCH_E2E_AGENT_ARGS", "--l7-hook syscalls --tls-probes exported"),
                )?;
            }
            if !no_vm && !filter.is_empty() {
                say("VM stage skipped: a test filter was given (cargo xtask vm-test runs it)");
            } else if !no_vm {
                say("the release agent on Debian 12's own kernel under qemu (vm-test)");
                build(true)?;
                vm::run(&vm::VmOptions { kernel: None })?;
            }
            if fuzz_seconds > 0 {
                say(&format!("a short fuzzing pass ({fuzz_seconds} s per target)"));
                fuzz::run(&fuzz::FuzzOptions { seconds: fuzz_seconds, targets: &[] })?;
            }
            Ok(())
        }
    }
}

/// The web UI's npm packages in hopwatch/ui/node_modules, exactly as package-lock.json pins
/// them (`npm ci`; integrity hashes checked). Runs only when the lock file differs from the copy
/// npm keeps in node_modules after a successful install. Installs Debian's npm (and Node.js)
/// when there is no npm.
fn ui_npm() -> Result<()> {
    let ui = workspace_root().join(UI_DIR);
    let lock = std::fs::read(ui.join("package-lock.json"))
        .with_context(|| format!("cannot read {UI_DIR}/package-lock.json"))?;
    let stamp = ui.join("node_modules/.hopwatch-lock");
    if std::fs::read(&stamp).is_ok_and(|have| have == lock) {
        return Ok(());
    }
    if output(Command::new("npm").arg("--version")).is_none() {
        apt_install(&["npm"])?;
    }
    say(&format!("installing the web UI's npm packages ({UI_DIR}/package-lock.json, npm ci)"));
    check(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&ui))?;
    std::fs::write(&stamp, lock).with_context(|| format!("cannot write {}", stamp.display()))
}

/// The vendored graph library is the build package-lock.json pins (so what the binary embeds is
/// what the lock file says).
fn ui_vendored_current() -> Result<()> {
    let ui = workspace_root().join(UI_DIR);
    for (from, to) in UI_VENDORED {
        let (a, b) = (std::fs::read(ui.join(from)), std::fs::read(ui.join(to)));
        if a.is_err() || a.ok() != b.ok() {
            bail!(
                "{UI_DIR}/{to} is not the {from} that package-lock.json pins: run `cargo xtask \
                 ui-vendor` and commit the result"
            );
        }
    }
    Ok(())
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`; the eBPF build finds it through PATH.
fn cargo_bin_on_path() {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(bin) = home.map(|h| h.join("bin")) else { return };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .expect("PATH entries have no separator in them");
    // SAFETY: called at the start of main, before any thread exists.
    unsafe { std::env::set_var("PATH", joined) };
}

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ is in the workspace").to_owned()
}

/// Runs a command, failing with its name when it fails.
fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str]) -> Result<()> {
    check(Command::new(env!("CARGO")).args(args).current_dir(workspace_root()))
}

fn build(release: bool) -> Result<()> {
    say(&format!("building hopwatch ({})", if release { "release" } else { "debug" }));
    let mut args = vec!["build", "-p", "hopwatch"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

/// Replaces this process with `cmd` (so signals reach the agent directly).
fn exec(cmd: &mut Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    cmd.exec()
}

/// Makes sure everything the build (and `extra` test packages) need is installed.
fn setup(extra: &[&str]) -> Result<()> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    packages.extend_from_slice(extra);
    apt_install(&packages)?;
    nightly_with_rust_src()?;
    bpf_linker()?;
    tracefs()?;
    Ok(())
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("Debian packages {} are missing; run as root to install them", missing.join(" "));
    }
    // A fresh machine's package lists are empty or stale.
    say("apt-get update (package lists)");
    check(Command::new("apt-get").args(["update", "-q"]))?;
    say(&format!("installing Debian packages: {}", missing.join(" ")));
    let _no_services = NoServiceStarts::new()?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Keeps the packages being installed from starting their system-wide daemons (nginx,
/// PostgreSQL's `main` cluster, Redis, MariaDB): their maintainer scripts start them through
/// invoke-rc.d, which without systemd runs the init scripts unless policy-rc.d forbids it (exit
/// 101). The tests start their own servers in network namespaces and need none of these. An
/// existing policy-rc.d (container images ship one) is left as it is.
struct NoServiceStarts {
    installed: bool,
}

impl NoServiceStarts {
    fn new() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { installed: false });
        }
        say(&format!("holding back service starts during the install ({POLICY_RC_D})"));
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask: no service starts during install\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(Self { installed: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.installed {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

/// Makes the virtualenv `venv` (Debian's python3 with venv) and installs `requirements` into it
/// with pip. pip runs only when the requirements file differs from the copy kept in the
/// virtualenv after its last successful install.
fn python_venv(requirements: &str, venv: &str) -> Result<()> {
    let root = workspace_root();
    let wanted = std::fs::read(root.join(requirements))
        .with_context(|| format!("cannot read {requirements}"))?;
    let venv_dir = root.join(venv);
    let stamp = venv_dir.join("requirements.installed");
    let python = venv_dir.join("bin/python");
    let python_works = Command::new(&python).args(["-c", ""]).status().is_ok_and(|s| s.success());
    if python_works && std::fs::read(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    if !python_works {
        say(&format!("creating the Python virtualenv {venv} (Debian's python3)"));
        // A virtualenv left by a different Python cannot be repaired in place.
        let _ = std::fs::remove_dir_all(&venv_dir);
        check(Command::new("/usr/bin/python3").arg("-m").arg("venv").arg(&venv_dir))?;
    }
    say(&format!("installing the Python packages of {requirements} into {venv}"));
    let _ = std::fs::remove_file(&stamp);
    check(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "-r"])
            .arg(root.join(requirements)),
    )?;
    std::fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))
}

fn nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (nightly + rust-src)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly Rust toolchain (the eBPF target needs -Z build-std)");
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to nightly (core is rebuilt for bpfel-unknown-none)");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("cannot run nightly rustc")?;
    let llvm = version.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("?");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but this set-up builds bpf-linker against LLVM \
             {LLVM_MAJOR}; update LLVM_MAJOR and BUILD_PACKAGES in xtask/src/main.rs"
        );
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        say(&format!("bpf-linker is {} ; installing {BPF_LINKER_VERSION}", v.trim()));
    }
    let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} ({prefix}); this takes \
         a minute or two"
    ));
    // Without the prefix variables the build finds Debian's default LLVM and fails to link.
    check(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(LLVM_SYS_PREFIX_VAR, &prefix),
    )
}

/// Classic tracepoints are attached through tracefs, which a fresh machine does not mount.
fn tracefs() -> Result<()> {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if Path::new(TRACEFS).join("events").is_dir() || !is_root() {
        return Ok(());
    }
    say(&format!("mounting tracefs at {TRACEFS}"));
    check(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
}
