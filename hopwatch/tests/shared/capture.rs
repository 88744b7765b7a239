//! What the integration test crates (`collector`, `compat`, `e2e`) share about the processes they
//! start: their output collected line by line, on a thread of its own.

use std::{
    io::{BufRead as _, BufReader},
    process::Child,
    sync::{Arc, Mutex},
};

/// Collects what `child` writes to its piped stderr into a shared string.
pub(crate) fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    capture(child.stderr.take().expect("stderr piped"))
}

/// Collects what a child writes to one of its pipes into a shared string.
pub(crate) fn capture(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    std::thread::spawn({
        let text = text.clone();
        move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = text.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
    text
}
