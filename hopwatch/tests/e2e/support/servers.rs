//! Real servers from Debian's packages (nginx, `PostgreSQL`, Redis, `MariaDB`, dnsmasq) and the test
//! `FastAPI` app, each started inside a [`Pod`] with its own temporary directory for data, config
//! and log. A handle returns only once its server really answers its own protocol (a real client
//! asks it, from inside the pod); a server that exits or stays silent fails the test with its log.
//! Dropping a handle stops the server's whole process group by its id and removes the directory,
//! also when a test panics.
//!
//! [`topology::Topology`] wires them into the chain the application-protocol tests use.

pub(crate) mod databases;
pub(crate) mod dns;
pub(crate) mod topology;
pub(crate) mod web;

use std::{
    fs::File,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

pub(crate) use self::{
    databases::{MariaDb, Postgres, Redis},
    dns::{Dnsmasq, ResolvConf},
    web::{AppBackends, FastApiApp, Nginx},
};
use super::{Pod, run};

/// How long a server may take to answer after it was started (`MariaDB` and uvicorn take about a
/// second on a 2-core machine; the margin is for a machine busy with parallel builds).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after its stop signal before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A directory for one server's files, removed with everything in it on drop.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<temp_base()>/hopwatch-e2e-<kind>-<pid>-<n>`, readable by everyone so that
    /// servers running as their own system user can reach their subdirectory.
    pub(crate) fn new(kind: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = temp_base().join(format!("hopwatch-e2e-{kind}-{}-{n}", std::process::id()));
        // A leftover of a killed run that had the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name` as a string, for command lines.
    pub(crate) fn file(&self, name: &str) -> String {
        self.path.join(name).to_str().expect("temp paths are UTF-8").to_owned()
    }

    /// A self-signed P-256 certificate for `/CN=<cn>` (and `ip` in its SAN, so clients can verify
    /// it with `--cacert`), made in `pod` as `cert.pem`/`key.pem` here: (certificate, key) paths.
    /// P-256 rather than RSA: generated in milliseconds.
    pub(crate) fn self_signed_cert(
        &self,
        pod: &Pod,
        cn: &str,
        ip: Option<std::net::Ipv4Addr>,
    ) -> (String, String) {
        let (cert, key) = (self.file("cert.pem"), self.file("key.pem"));
        let subject = format!("/CN={cn}");
        let san = ip.map(|ip| format!("subjectAltName=IP:{ip}"));
        let mut args = vec![
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subject,
        ];
        if let Some(san) = &san {
            args.extend(["-addext", san]);
        }
        output_in(pod, &args);
        (cert, key)
    }

    /// Creates `path/name` owned by `user` and that user's group: `PostgreSQL` and `MariaDB` run as
    /// their own system users and must own their data directory.
    pub(crate) fn owned_subdir(&self, name: &str, user: &str) -> String {
        let dir = self.file(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {dir}: {e}"));
        run(&["chown", &format!("{user}:"), &dir]);
        dir
    }

    /// Writes `text` to `path/name`; returns the path.
    pub(crate) fn write(&self, name: &str, text: &str) -> String {
        let file = self.file(name);
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("cannot write {file}: {e}"));
        file
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where servers keep their files: the tmpfs at /dev/shm when there is one, since databases
/// fsync a lot and nothing here must outlive the test; the temp dir otherwise.
pub(crate) fn temp_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() }
}

/// Gives `dest` (which must not exist) a copy of a pristine data directory that `init` fills
/// (it gets an empty directory owned by `owner`). The pristine copy is made once per machine and
/// `key` (server version and set-up) and kept under `target/e2e-templates/`: initdb and
/// mariadb-install-db spend seconds in fsync, a copy takes a tenth of one.
pub(crate) fn data_dir_from_template(key: &str, owner: &str, dest: &str, init: impl FnOnce(&str)) {
    static BUILDING: Mutex<()> = Mutex::new(());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-templates");
    let template = root.join(key);
    {
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !template.join("data").is_dir() {
            // Built under the temp dir, where the server's user can reach it (the checkout may
            // be in a directory only root can enter), then moved in whole: a run killed halfway
            // leaves no half-made template.
            let scratch = TempDir::new("template");
            let data = scratch.owned_subdir("data", owner);
            init(&data);
            std::fs::create_dir_all(&root)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
            let partial = root.join(format!("{key}.partial-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir(&partial)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", partial.display()));
            run(&["cp", "-a", &data, path_str(&partial.join("data"))]);
            if std::fs::rename(&partial, &template).is_err() {
                // Another process made it meanwhile.
                let _ = std::fs::remove_dir_all(&partial);
            }
        }
    }
    run(&["cp", "-a", path_str(&template.join("data")), dest]);
}

/// A template key part from a server's `--version` output: letters, digits, dots and dashes.
pub(crate) fn version_key(version_output: &str) -> String {
    let mut key: String = version_output
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .collect();
    key.truncate(120);
    key
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// One server process started in a pod, in a process group of its own (so that its workers and
/// backends can be stopped with it), its stdout and stderr going to a log file.
pub(crate) struct ServerProcess {
    name: String,
    netns: String,
    child: Child,
    log: PathBuf,
    stop_signal: i32,
}

impl ServerProcess {
    /// Starts `args` inside `pod` with `env` added to the environment; `stop_signal` is the
    /// signal that makes this server shut down quickly.
    pub(crate) fn spawn(
        name: &str,
        pod: &Pod,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
        stop_signal: i32,
    ) -> Self {
        let out =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone the log file descriptor");
        // `ip netns exec`, setpriv and the servers all exec: the child's pid is the server's.
        let child = pod
            .command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {name} ({args:?}) in {}: {e} (`cargo xtask test` installs the \
                     test servers)",
                    pod.netns
                )
            });
        Self { name: name.to_owned(), netns: pod.netns.clone(), child, log, stop_signal }
    }

    /// The server's (main) process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read(&self.log).map_or_else(
            |e| format!("(cannot read the log {}: {e})", self.log.display()),
            |b| String::from_utf8_lossy(&b).into_owned(),
        )
    }

    /// The server's children (nginx workers, `PostgreSQL` backends, ...).
    pub(crate) fn children(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Whether the server has exited, without reaping it: while it is a zombie its pid and
    /// process-group id cannot be reused, so the group can still be signalled safely.
    fn exit_code(&self) -> Option<i32> {
        // SAFETY: an all-zero siginfo_t is a valid value; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer; WNOWAIT leaves it
        // waitable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid(),
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
        (rc == 0 && unsafe { info.si_pid() } != 0).then(|| unsafe { info.si_status() })
    }

    /// Polls `ready` until it is true; panics with the server's log if the server exits first or
    /// `READY_TIMEOUT` passes.
    pub(crate) fn wait_until(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Some(code) = self.exit_code() {
                panic!(
                    "{} (pid {}) in {} exited (status/signal {code}) before {what}; its log:\n{}",
                    self.name,
                    self.pid(),
                    self.netns,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "{} (pid {}) in {} not {what} after {READY_TIMEOUT:?}; its log:\n{}",
                self.name,
                self.pid(),
                self.netns,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let pid = self.pid().cast_signed();
        if self.exit_code().is_none() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid, self.stop_signal) };
            let deadline = Instant::now() + STOP_GRACE;
            while self.exit_code().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left of the group: workers or backends that outlived their parent, or a
        // server that ignored its stop signal. The unreaped leader keeps the group id ours.
        // SAFETY: the group was created for this child (process_group(0)).
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Pids whose parent is `pid`, from /proc.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // The command name in parentheses may hold spaces; the parent pid is the second
                // field after it.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Whether `args` run inside `pod` exits successfully (for readiness probes; output discarded).
pub(crate) fn succeeds(pod: &Pod, args: &[&str]) -> bool {
    pod.command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `args` inside `pod`, returning stdout; panics with both outputs if it fails.
pub(crate) fn output_in(pod: &Pod, args: &[&str]) -> String {
    let out = pod
        .command(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", pod.netns));
    assert!(
        out.status.success(),
        "{args:?} in {} failed ({}): {}{}",
        pod.netns,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
