//! The agent's side of the kernel's exchange engine maps: promotions handed to the kernel and the
//! "someone follows" switch (see `hopwatch_common::exchange`).

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use hopwatch_common::{exchange::Promotion, maps::PROMOTIONS};

/// Name of the follow switch map in the kernel object.
const EXCHANGE_CONTROL: &str = "EXCHANGE_CONTROL";

pub(crate) struct ExchangeMaps {
    promotions: HashMap<MapData, u64, Promotion>,
    control: Array<MapData, u32>,
    followed: Option<bool>,
    /// Promotions the kernel map refused (full); those sockets stay on the capture path.
    pub refused: u64,
}

impl ExchangeMaps {
    /// Takes the engine's maps out of the object; `None` when the object has none (L7 capture
    /// off).
    pub(crate) fn take(ebpf: &mut Ebpf) -> Option<Self> {
        let promotions = HashMap::try_from(ebpf.take_map(PROMOTIONS)?).ok()?;
        let control = Array::try_from(ebpf.take_map(EXCHANGE_CONTROL)?).ok()?;
        Some(Self { promotions, control, followed: None, refused: 0 })
    }

    /// Hands sockets to the kernel's engine.
    pub(crate) fn promote(&mut self, promotions: impl IntoIterator<Item = (u64, Promotion)>) {
        for (cookie, p) in promotions {
            if self.promotions.insert(cookie, p, 0).is_err() {
                self.refused += 1;
            }
        }
    }

    /// Someone follows the flows (every exchange recorded in full) or not; written on change.
    pub(crate) fn set_followed(&mut self, followed: bool) {
        if self.followed == Some(followed) {
            return;
        }
        if self.control.set(0, u32::from(followed), 0).is_ok() {
            self.followed = Some(followed);
        }
    }
}
