//! `PostgreSQL`, `MariaDB` and Redis, each a throwaway instance in a pod: data in a temporary
//! directory, durability switched off (nothing here must survive the test), listening on the
//! pod's address only.

use std::{net::Ipv4Addr, path::PathBuf};

use super::{ServerProcess, TempDir, data_dir_from_template, output_in, succeeds, version_key};
use crate::support::{Pod, run};

/// The user, password and database every backend is set up with.
pub(crate) const DB_USER: &str = "hopwatch";
pub(crate) const DB_PASSWORD: &str = "hopwatch";
pub(crate) const DB_NAME: &str = "hopwatch";

// ============================================================================================
// PostgreSQL
// ============================================================================================

/// A `PostgreSQL` server (Debian's newest installed major version) running as the `postgres`
/// system user, with a `hopwatch` superuser (trust authentication) and a `hopwatch` database.
pub(crate) struct Postgres {
    // Field order is drop order: the process stops before its directory goes.
    process: ServerProcess,
    _dir: TempDir,
    pod: Pod,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The server's command line, for [`Postgres::restart`].
    args: Vec<String>,
}

impl Postgres {
    pub(crate) const PORT: u16 = 5432;

    pub(crate) fn start(pod: &Pod) -> Self {
        let dir = TempDir::new("postgres");
        let data = dir.file("data");
        let bin = postgres_bin_dir();
        let as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"];
        let initdb_bin = bin.join("initdb");
        let initdb_bin = initdb_bin.to_str().expect("UTF-8 path");
        let version = run(&[initdb_bin, "--version"]);
        let key = format!("postgres-{}-r2", version_key(&String::from_utf8_lossy(&version.stdout)));
        data_dir_from_template(&key, "postgres", &data, |empty| {
            let mut initdb = as_postgres.to_vec();
            initdb.extend([
                initdb_bin,
                "-D",
                empty,
                "-U",
                DB_USER,
                "--auth=trust",
                // Nothing needs to survive a crash of this machine.
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                // 1 MB WAL segments instead of 16: a smaller directory to copy per server.
                "--wal-segsize=1",
            ]);
            output_in(pod, &initdb);
            // The database too, in single-user mode (no server, no network): CREATE DATABASE
            // on a running server costs half a second per test.
            let postgres_bin = bin.join("postgres");
            let mut single = as_postgres.to_vec();
            single.extend([
                postgres_bin.to_str().expect("UTF-8 path"),
                "--single",
                "-D",
                empty,
                "-c",
                "fsync=off",
                "postgres",
            ]);
            let mut child = pod
                .command(&single)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start postgres --single");
            std::io::Write::write_all(
                &mut child.stdin.take().expect("piped"),
                format!("CREATE DATABASE {DB_NAME};\n").as_bytes(),
            )
            .expect("write to postgres --single");
            let out = child.wait_with_output().expect("postgres --single ran");
            let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !text.contains("ERROR"),
                "CREATE DATABASE in single-user mode failed ({}): {text}",
                out.status
            );
        });
        // initdb's own pg_hba.conf trusts only local connections; the app connects over TCP.
        let hba = dir.write("pg_hba.conf", "local all all trust\nhost all all 0.0.0.0/0 trust\n");
        let ip = pod.ip;
        let postgres_bin = bin.join("postgres");
        let mut args = as_postgres.to_vec();
        let settings = [
            format!("listen_addresses={ip}"),
            format!("port={}", Self::PORT),
            // The default (/var/run/postgresql) belongs to Debian's own cluster.
            format!("unix_socket_directories={data}"),
            format!("hba_file={hba}"),
            // In the data directory, not /dev/shm: a killed server leaves nothing behind.
            "dynamic_shared_memory_type=mmap".to_owned(),
            "fsync=off".to_owned(),
            "synchronous_commit=off".to_owned(),
            "full_page_writes=off".to_owned(),
        ];
        args.extend([postgres_bin.to_str().expect("UTF-8 path"), "-D", &data]);
        for s in &settings {
            args.extend(["-c", s]);
        }
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let process = Self::spawn(pod, &args, &dir, "log");
        Self { process, _dir: dir, pod: pod.clone(), ip, port: Self::PORT, args }
    }

    /// Starts the server and waits until it accepts connections; its output goes to `log`.
    fn spawn(pod: &Pod, args: &[String], dir: &TempDir, log: &str) -> ServerProcess {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // SIGINT: fast shutdown (clients disconnected, a checkpoint that fsync=off makes cheap).
        let process =
            ServerProcess::spawn("postgres", pod, &args, &[], dir.path().join(log), libc::SIGINT);
        let (host, port) = (pod.ip.to_string(), Self::PORT.to_string());
        process.wait_until("accepting connections", || {
            succeeds(
                pod,
                &["pg_isready", "-q", "-h", &host, "-p", &port, "-U", DB_USER, "-d", "postgres"],
            )
        });
        process
    }

    /// Stops the server (fast shutdown) and starts it again on the same data: a new postmaster
    /// and new backends.
    #[must_use]
    pub(crate) fn restart(self) -> Self {
        let Self { process, _dir: dir, pod, ip, port, args } = self;
        drop(process);
        let process = Self::spawn(&pod, &args, &dir, "log-restarted");
        Self { process, _dir: dir, pod, ip, port, args }
    }

    /// The postmaster's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn log(&self) -> String {
        self.process.log()
    }

    /// Runs `sql` on the `hopwatch` database with psql (over TCP, from the db pod); returns the
    /// unaligned, tuples-only output.
    pub(crate) fn psql(&self, sql: &str) -> String {
        let (host, port) = (self.ip.to_string(), self.port.to_string());
        output_in(
            &self.pod,
            &[
                "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                DB_USER,
                "-d",
                DB_NAME,
                "-c",
                sql,
            ],
        )
    }
}

/// `/usr/lib/postgresql/<newest major>/bin` (Debian installs servers per major version).
fn postgres_bin_dir() -> PathBuf {
    let root = PathBuf::from("/usr/lib/postgresql");
    let newest = std::fs::read_dir(&root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| root.join(v.to_string()).join("bin/postgres").exists())
        .max()
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server under {} (`cargo xtask test` installs Debian's postgresql)",
                root.display()
            )
        });
    root.join(newest.to_string()).join("bin")
}

// ============================================================================================
// MariaDB
// ============================================================================================

/// A `MariaDB` server running as the `mysql` system user, with a `hopwatch` user (password
/// `hopwatch`, from any host) owning a `hopwatch` database.
pub(crate) struct MariaDb {
    process: ServerProcess,
    _dir: TempDir,
    pod: Pod,
    socket: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl MariaDb {
    pub(crate) const PORT: u16 = 3306;

    pub(crate) fn start(pod: &Pod) -> Self {
        Self::start_with(pod, &[])
    }

    /// A server with `extra` options (e.g. `--max-connections=1`).
    pub(crate) fn start_with(pod: &Pod, extra: &[&str]) -> Self {
        let dir = TempDir::new("mariadb");
        let data = dir.file("data");
        let datadir = format!("--datadir={data}");
        // Small InnoDB files: the default 100 MB redo log costs more time to write than the
        // whole test spends querying.
        let small = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=16M"];
        let version = run(&["mariadbd", "--version"]);
        let key = format!("mariadb-{}-r1", version_key(&String::from_utf8_lossy(&version.stdout)));
        data_dir_from_template(&key, "mysql", &data, |empty| {
            let datadir = format!("--datadir={empty}");
            let mut install = vec![
                "mariadb-install-db",
                "--no-defaults",
                &datadir,
                "--user=mysql",
                // root@localhost logs in through the socket without a password (the test is
                // root).
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ];
            install.extend(small);
            output_in(pod, &install);
        });
        let ip = pod.ip;
        let socket = format!("{data}/mysqld.sock");
        let (bind, port_arg, socket_arg, pid_arg) = (
            format!("--bind-address={ip}"),
            format!("--port={}", Self::PORT),
            format!("--socket={socket}"),
            format!("--pid-file={data}/mariadbd.pid"),
        );
        let mut args = vec![
            "mariadbd",
            "--no-defaults",
            &datadir,
            "--user=mysql",
            &bind,
            &port_arg,
            &socket_arg,
            &pid_arg,
            // Reverse lookups of client addresses would go to the host's resolver and stall.
            "--skip-name-resolve",
            "--skip-log-bin",
        ];
        args.extend(small);
        args.extend(extra);
        let process = ServerProcess::spawn(
            "mariadbd",
            pod,
            &args,
            &[],
            dir.path().join("log"),
            libc::SIGTERM,
        );
        process.wait_until("accepting connections", || {
            succeeds(pod, &["mariadb-admin", "--no-defaults", &socket_arg, "-uroot", "ping"])
        });
        let db = Self { process, _dir: dir, pod: pod.clone(), socket, ip, port: Self::PORT };
        output_in(
            pod,
            &[
                "mariadb",
                "--no-defaults",
                &format!("--socket={}", db.socket),
                "-uroot",
                "-e",
                &format!(
                    "CREATE DATABASE {DB_NAME}; \
                     CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{DB_PASSWORD}'; \
                     GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'%';"
                ),
            ],
        );
        // Proves the TCP listener and the user work, not just the socket.
        let one = db.sql("SELECT 1");
        assert_eq!(one.trim(), "1", "MariaDB over TCP answered {one:?}; log:\n{}", db.log());
        db
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn log(&self) -> String {
        self.process.log()
    }

    /// A client that holds a connection for `secs` seconds (`SELECT SLEEP`): as root through the
    /// server's socket, or as the `hopwatch` user over TCP. The caller ends it.
    pub(crate) fn hold_connection(&self, secs: u32, as_root: bool) -> std::process::Child {
        let (host, port, socket) =
            (self.ip.to_string(), self.port.to_string(), format!("--socket={}", self.socket));
        let sleep = format!("SELECT SLEEP({secs})");
        let password = format!("-p{DB_PASSWORD}");
        let mut args = vec!["mariadb", "--no-defaults", "--skip-ssl"];
        if as_root {
            args.extend([socket.as_str(), "-uroot"]);
        } else {
            args.extend(["-h", &host, "-P", &port, "-u", DB_USER, &password]);
        }
        args.extend(["-e", &sleep]);
        self.pod
            .command(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadb client starts")
    }

    /// Runs `sql` as the `hopwatch` user on its database over TCP from the mysql pod; returns the
    /// tab-separated rows without column names.
    pub(crate) fn sql(&self, sql: &str) -> String {
        let (host, port) = (self.ip.to_string(), self.port.to_string());
        output_in(
            &self.pod,
            &[
                "mariadb",
                "--no-defaults",
                "--skip-ssl",
                "-h",
                &host,
                "-P",
                &port,
                "-u",
                DB_USER,
                &format!("-p{DB_PASSWORD}"),
                "-N",
                "-B",
                DB_NAME,
                "-e",
                sql,
            ],
        )
    }
}

// ============================================================================================
// Redis
// ============================================================================================

/// A Redis server without persistence, with `DEBUG` enabled (for `DEBUG SLEEP`).
pub(crate) struct Redis {
    process: ServerProcess,
    _dir: TempDir,
    pod: Pod,
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Redis {
    pub(crate) const PORT: u16 = 6379;

    pub(crate) fn start(pod: &Pod) -> Self {
        Self::start_on(pod, Self::PORT)
    }

    pub(crate) fn start_on(pod: &Pod, port: u16) -> Self {
        Self::start_with(pod, port, false)
    }

    /// Redis as it starts without configuration: protected mode on and no password, so a client
    /// from another address than loopback gets `-DENIED ...` and the connection closed. It also
    /// listens on the pod's loopback, where it answers (for the readiness check).
    pub(crate) fn start_protected(pod: &Pod) -> Self {
        Self::start_with(pod, Self::PORT, true)
    }

    fn start_with(pod: &Pod, port: u16, protected: bool) -> Self {
        let dir = TempDir::new("redis");
        let ip = pod.ip;
        let (ip_s, port_s) = (ip.to_string(), port.to_string());
        let args = [
            "redis-server",
            "--bind",
            &if protected { format!("{ip_s} 127.0.0.1") } else { ip_s.clone() },
            "--port",
            &port_s,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            if protected { "yes" } else { "no" },
            // Redis 7 refuses DEBUG unless told otherwise.
            "--enable-debug-command",
            "yes",
            "--dir",
            dir.path().to_str().expect("UTF-8 path"),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ];
        let process = ServerProcess::spawn(
            "redis-server",
            pod,
            &args,
            &[],
            dir.path().join("log"),
            libc::SIGTERM,
        );
        let redis = Self { process, _dir: dir, pod: pod.clone(), ip, port };
        // Its own process id in INFO: a PING could be answered by another server on the port.
        let me = format!("process_id:{}", redis.pid());
        let host = if protected { "127.0.0.1".to_owned() } else { ip_s.clone() };
        redis.process.wait_until("answering INFO", || {
            redis
                .pod
                .command(&["redis-cli", "-h", &host, "-p", &port_s, "INFO", "server"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == me))
        });
        redis
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn log(&self) -> String {
        self.process.log()
    }

    /// Runs one command with redis-cli from the cache pod; returns its raw output.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let (host, port) = (self.ip.to_string(), self.port.to_string());
        let mut full = vec!["redis-cli", "--raw", "-h", &host, "-p", &port];
        full.extend_from_slice(args);
        output_in(&self.pod, &full)
    }
}
