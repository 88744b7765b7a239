//! The kernel's connection map seen from the agent: which sockets the kernel still tracks. A
//! socket's entry goes when it closes, in the same program that reports the close, so a socket
//! the agent holds and the kernel does not is one whose close event was lost (a full ring
//! buffer).

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError},
};
use hopwatch_common::{ConnState, maps::CONNS};

pub(crate) struct KernelConns {
    map: HashMap<MapData, u64, ConnState>,
}

impl KernelConns {
    /// A second handle on the object's connection map (the object keeps its own, for the
    /// map-fill metrics); `None` when it has none.
    pub(crate) fn open(ebpf: &Ebpf) -> Option<Self> {
        let Map::LruHashMap(data) = ebpf.map(CONNS)? else { return None };
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        let map = HashMap::try_from(Map::LruHashMap(MapData::from_fd(fd).ok()?)).ok()?;
        Some(Self { map })
    }

    /// Whether the kernel still tracks the socket `cookie` (a failed lookup other than "no such
    /// key" counts as tracked: nothing is forgotten on a doubt).
    pub(crate) fn tracks(&self, cookie: u64) -> bool {
        !matches!(self.map.get(&cookie, 0), Err(MapError::KeyNotFound))
    }
}
