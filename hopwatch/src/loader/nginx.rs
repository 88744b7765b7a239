//! nginx uprobes: every running nginx binary (the host's and those inside containers), with the
//! upstream-request program (`hopwatch-ebpf/src/nginx.rs`) attached once per file
//! ([`FileProbes`]). The probed function is one nginx exports for its dynamic modules, so
//! distribution builds without debug symbols are covered; a static build that exports nothing
//! is reported as a failure to attach.

use std::path::{Path, PathBuf};

use aya::Ebpf;

use super::{
    LoadError,
    uprobes::{FileProbes, Probe, Site, process_files},
};

const PROGRAM: &str = "nginx_chain_writer";

/// Where distributions put nginx.
const DEFAULT_NGINX: [&str; 2] = ["/usr/sbin/nginx", "/usr/local/openresty/nginx/sbin/nginx"];

/// Loads the nginx uprobe (attached by [`FileProbes::scan`]).
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<FileProbes, LoadError> {
    FileProbes::load(ebpf, "nginx", &[PROGRAM], plan, candidate_binaries)
}

fn plan(_: &Path) -> Vec<Probe> {
    vec![Probe { program: PROGRAM, site: Site::Symbol("ngx_chain_writer") }]
}

/// The host's nginx and the binaries of running processes named nginx (container roots
/// included).
fn candidate_binaries() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        DEFAULT_NGINX.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    out.extend(process_files(|proc| {
        let Ok(exe) = std::fs::read_link(format!("{proc}/exe")) else { return Vec::new() };
        let named = Path::new(&exe).file_name().and_then(|f| f.to_str()) == Some("nginx");
        let path = exe.to_string_lossy();
        // A binary replaced on disk shows " (deleted)": not a file to attach to.
        if named && !path.ends_with(" (deleted)") { vec![path.into_owned()] } else { Vec::new() }
    }));
    out
}
