//! Kubernetes metadata: the API client (in-cluster by default, a kubeconfig from outside) and
//! the watchers that keep [`store::KubeState`] current.

#[cfg(feature = "kubernetes")]
mod client;
#[cfg_attr(
    not(feature = "kubernetes"),
    allow(dead_code, unreachable_pub, reason = "the state is filled only by the API watchers")
)]
pub(crate) mod store;
#[cfg(feature = "kubernetes")]
mod watch;

#[cfg(feature = "kubernetes")]
pub use self::client::*;
