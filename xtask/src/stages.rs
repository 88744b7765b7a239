//! Test stages under a time limit: a hung test fails its stage, naming it, instead of using up
//! a CI run's time.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long each test stage may take, its build included: several times what it takes on a
/// 2-core machine (the e2e tests run in about 7 min, the collector tests in 1). A test that
/// hangs fails its stage with a message instead of using up a CI run's time without saying
/// where.
pub const COLLECTOR_STAGE_LIMIT: Duration = Duration::from_mins(20);
pub const E2E_STAGE_LIMIT: Duration = Duration::from_mins(30);
pub const SYSCALL_STAGE_LIMIT: Duration = Duration::from_mins(15);

/// Runs `cmd` as `check` (main.rs) does, but kills it (with every process it started) after
/// `limit`. The command stays in this terminal's process group, so Ctrl-C still reaches it.
pub fn within(limit: Duration, cmd: &mut Command) -> Result<()> {
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for a test stage")? {
            if !status.success() {
                bail!("{cmd:?} failed ({status})");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut pids = descendants(child.id());
            pids.push(child.id());
            for pid in pids {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {} min and was killed: the test it was running is \
                 the last `test … ` line above",
                limit.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Every process below `pid` (children first listed, then theirs), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_past_its_limit_is_killed_with_everything_it_started() {
        let started = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $! > \"$0\"; sleep 30"]);
        let pidfile = tempfile_path();
        cmd.arg(&pidfile);
        let err = within(Duration::from_secs(1), &mut cmd).expect_err("the stage overran");
        assert!(err.to_string().contains("did not finish within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "killed at its limit");
        let grandchild =
            std::fs::read_to_string(&pidfile).expect("the shell wrote its child's pid");
        let _ = std::fs::remove_file(&pidfile);
        let state = std::fs::read_to_string(format!("/proc/{}/stat", grandchild.trim()));
        // Gone, or a zombie waiting for init to reap it.
        assert!(
            state.is_err() || state.unwrap().contains(") Z "),
            "the background sleep was killed"
        );
    }

    #[test]
    fn a_stage_within_its_limit_passes_its_status_through() {
        within(Duration::from_secs(10), &mut Command::new("true")).expect("true succeeds");
        let err = within(Duration::from_secs(10), &mut Command::new("false")).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
    }

    fn tempfile_path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("xtask-within-{}", std::process::id()))
    }
}
