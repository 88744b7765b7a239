//! Socket owner's cgroup → container or systemd unit.
//!
//! The kernel stamps every event with the owner's cgroup v2 id, which is the inode number of the
//! cgroup's directory under the cgroup2 mount. A background task walks the hierarchy and keeps an
//! id → path map (readdir gives inode numbers for free, so a walk is one `getdents` per cgroup);
//! the flow path only reads that map, and a miss asks for an early rescan. The path names the
//! container the way each runtime lays out its cgroups:
//!
//! | runtime | cgroup path (last components) |
//! |---|---|
//! | containerd (kubelet, systemd driver) | `kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` |
//! | containerd (cgroupfs driver) | `kubepods/burstable/pod<uid>/<id>` |
//! | CRI-O | `kubepods-pod<uid>.slice/crio-<id>.scope` |
//! | Docker (systemd driver) | `system.slice/docker-<id>.scope` |
//! | Docker (cgroupfs driver) | `docker/<id>` |
//! | Podman | `libpod-<id>.scope` |
//!
//! Anything else under `*.slice/<unit>.service` is a systemd unit.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

/// Cgroups remembered; a walk stops here (and counts what it skipped).
const MAX_CGROUPS: usize = 200_000;
/// Deepest hierarchy walked.
const MAX_DEPTH: usize = 16;
/// Full rescan interval (new containers are also picked up by the miss-triggered rescans).
const RESCAN_EVERY: Duration = Duration::from_secs(5);
/// Shortest time between two miss-triggered rescans.
const MISS_RESCAN_GAP: Duration = Duration::from_millis(100);
/// Pending misses waiting for the resolver.
const MISS_QUEUE: usize = 1024;

/// What a cgroup path says about its processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupInfo {
    /// Path relative to the cgroup2 mount, with a leading `/`.
    pub path: String,
    /// 64-hex container id.
    pub container_id: Option<String>,
    /// `containerd`, `cri-o`, `docker`, `podman`.
    pub runtime: Option<&'static str>,
    /// Kubernetes pod uid (dashes restored), for pods managed by the kubelet.
    pub pod_uid: Option<String>,
    /// systemd unit (`nginx.service`) for processes outside containers.
    pub unit: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod uid a kubelet cgroup names: `kubepods-burstable-pod<uid with underscores>.slice`
/// (systemd driver) or `kubepods/burstable/pod<uid>` (cgroupfs driver).
fn pod_uid(part: &str, parent: &str) -> Option<String> {
    let uid = if let Some(slice) = part.strip_suffix(".slice") {
        slice.rsplit('-').next()?.strip_prefix("pod")?
    } else if parent.starts_with("kubepods")
        || matches!(parent, "burstable" | "besteffort" | "guaranteed")
    {
        part.strip_prefix("pod")?
    } else {
        return None;
    };
    (uid.len() == 36).then(|| uid.replace('_', "-"))
}

/// Parses a cgroup path (relative to the cgroup2 mount, any prefix) into what it names.
pub(crate) fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo { path: path.to_owned(), ..CgroupInfo::default() };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let parent = if i > 0 { parts[i - 1] } else { "" };
        if let Some(uid) = pod_uid(part, parent) {
            info.pod_uid = Some(uid);
        }
        let scope = part.strip_suffix(".scope").unwrap_or(part);
        let (runtime, id) = if let Some(id) = scope.strip_prefix("cri-containerd-") {
            (Some("containerd"), id)
        } else if let Some(id) = scope.strip_prefix("crio-") {
            (Some("cri-o"), id)
        } else if let Some(id) = scope.strip_prefix("docker-") {
            (Some("docker"), id)
        } else if let Some(id) = scope.strip_prefix("libpod-") {
            (Some("podman"), id)
        } else if is_container_id(part) {
            // cgroupfs layouts: `docker/<id>`, `kubepods/.../pod<uid>/<id>`.
            let runtime = if parent == "docker" {
                Some("docker")
            } else if info.pod_uid.is_some() {
                Some("containerd")
            } else {
                None
            };
            (runtime.or(Some("unknown")), *part)
        } else {
            (None, "")
        };
        if runtime.is_some() && is_container_id(id) {
            info.container_id = Some(id.to_owned());
            info.runtime = runtime;
        }
    }
    if info.container_id.is_none() && info.pod_uid.is_none() {
        info.unit = parts.iter().rev().find(|p| p.ends_with(".service")).map(|p| (*p).to_owned());
    }
    info
}

/// Finds the cgroup2 mount point from `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mount = pre.split(' ').nth(4)?;
        (post.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(mount))
    })
}

/// What the cache knows about a cgroup id.
#[derive(Debug, Clone)]
pub(crate) enum Lookup {
    Known(Arc<CgroupInfo>),
    /// The last walk did not find it (a cgroup already removed); asked again after the next
    /// periodic walk.
    Unknown,
    /// Not walked yet: a rescan is on its way.
    Pending,
}

#[derive(Default)]
struct Tables {
    known: HashMap<u64, Arc<CgroupInfo>>,
    unknown: HashSet<u64>,
}

/// id → cgroup, shared between the resolver task and the flow path.
#[derive(Clone)]
pub(crate) struct CgroupCache {
    tables: Arc<RwLock<Tables>>,
    misses: mpsc::Sender<u64>,
}

impl CgroupCache {
    /// Starts the resolver task over the hierarchy mounted at `root`.
    pub(crate) fn start(root: PathBuf, cancel: tokio_util::sync::CancellationToken) -> Self {
        let tables = Arc::new(RwLock::new(Tables::default()));
        let (misses, rx) = mpsc::channel(MISS_QUEUE);
        tokio::spawn(resolve_loop(root, tables.clone(), rx, cancel));
        Self { tables, misses }
    }

    /// What is known of cgroup `id`; a pending id asks the resolver for a rescan.
    pub(crate) fn lookup(&self, id: u64) -> Lookup {
        if id == 0 {
            return Lookup::Unknown;
        }
        let t = self.tables.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(info) = t.known.get(&id) {
            return Lookup::Known(info.clone());
        }
        if t.unknown.contains(&id) {
            return Lookup::Unknown;
        }
        drop(t);
        // A full queue means a rescan is coming anyway.
        let _ = self.misses.try_send(id);
        Lookup::Pending
    }

    /// The cgroup with id `id`, if known.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        match self.lookup(id) {
            Lookup::Known(info) => Some(info),
            Lookup::Unknown | Lookup::Pending => None,
        }
    }
}

async fn resolve_loop(
    root: PathBuf,
    tables: Arc<RwLock<Tables>>,
    mut misses: mpsc::Receiver<u64>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    let mut last = Instant::now().checked_sub(RESCAN_EVERY).unwrap_or_else(Instant::now);
    let mut warned = false;
    let read = || tables.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let asked_for = tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => None,
            id = misses.recv() => match id { Some(id) => Some(id), None => return },
        };
        let periodic = asked_for.is_none();
        if let Some(id) = asked_for {
            if read().known.contains_key(&id) || read().unknown.contains(&id) {
                continue;
            }
            let wait = MISS_RESCAN_GAP.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let walk_root = root.clone();
        let Ok(walked) = tokio::task::spawn_blocking(move || walk(&walk_root)).await else {
            return;
        };
        last = Instant::now();
        if walked.truncated && !warned {
            warned = true;
            tracing::warn!(root = %root.display(), max = MAX_CGROUPS, "more cgroups than the agent keeps; some are not named");
        }
        let mut t = tables.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Keep the parsed entries of cgroups that still exist.
        let mut next = HashMap::with_capacity(walked.paths.len());
        for (id, path) in walked.paths {
            let info = match t.known.remove(&id) {
                Some(old) if old.path == path => old,
                _ => Arc::new(parse_path(&path)),
            };
            next.insert(id, info);
        }
        t.known = next;
        if periodic {
            t.unknown.clear();
        }
        // What was asked for and is still not there is gone.
        let asked: Vec<u64> =
            std::iter::from_fn(|| misses.try_recv().ok()).chain(asked_for).collect();
        for id in asked {
            if !t.known.contains_key(&id) && t.unknown.len() < MAX_CGROUPS {
                t.unknown.insert(id);
            }
        }
    }
}

struct Walked {
    paths: Vec<(u64, String)>,
    truncated: bool,
}

/// Every cgroup under `root`: (id, path relative to root).
fn walk(root: &Path) -> Walked {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Walked { paths: Vec::new(), truncated: false };
    if let Ok(meta) = std::fs::metadata(root) {
        out.paths.push((meta.ino(), "/".to_owned()));
    }
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if out.paths.len() >= MAX_CGROUPS {
                out.truncated = true;
                return out;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            out.paths.push((e.ino(), path.clone()));
            if depth + 1 < MAX_DEPTH {
                stack.push((e.path(), path, depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2d1a9c3b7e8d6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    #[test]
    fn names_containers_in_each_runtime_layout() {
        let uid = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b";
        let uid_ = uid.replace('-', "_");
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                "containerd",
                true,
            ),
            (format!("/kubepods/burstable/pod{uid}/{ID}"), "containerd", true),
            (format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"), "cri-o", true),
            (format!("/system.slice/docker-{ID}.scope"), "docker", false),
            (format!("/docker/{ID}"), "docker", false),
            (format!("/machine.slice/libpod-{ID}.scope/container"), "podman", false),
        ];
        for (path, runtime, in_pod) in cases {
            let info = parse_path(&path);
            assert_eq!(info.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(info.runtime, Some(runtime), "{path}");
            assert_eq!(info.pod_uid.as_deref(), in_pod.then_some(uid), "{path}");
            assert_eq!(info.unit, None, "{path}");
        }
    }

    #[test]
    fn names_systemd_units_outside_containers() {
        let info = parse_path("/system.slice/nginx.service");
        assert_eq!(info.unit.as_deref(), Some("nginx.service"));
        assert_eq!(info.container_id, None);
        assert_eq!(parse_path("/user.slice/user-1000.slice/session-3.scope").unit, None);
        assert_eq!(parse_path("/").unit, None);
        // Not a container id: too short.
        assert_eq!(parse_path("/docker/abc").container_id, None);
    }

    #[test]
    fn walks_a_directory_tree_with_inode_numbers() {
        use std::os::unix::fs::MetadataExt as _;

        let dir = std::env::temp_dir().join(format!("hw-cg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("system.slice/nginx.service")).unwrap();
        let walked = walk(&dir);
        let ino = std::fs::metadata(dir.join("system.slice/nginx.service")).unwrap().ino();
        assert!(
            walked.paths.contains(&(ino, "/system.slice/nginx.service".to_owned())),
            "{:?}",
            walked.paths
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
