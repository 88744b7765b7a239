//! The API client (in-cluster by default, a kubeconfig from outside) and the watchers that keep
//! [`KubeState`] current; built with the `kubernetes` feature.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

pub use super::watch::PodScope;
use super::{store::KubeState, watch};

/// How often pods deleted longer than the grace period ago are forgotten.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot use the in-cluster Kubernetes configuration (is the agent running in a pod with a \
         service account? use --kubeconfig from outside a cluster): {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Where the API server is.
#[derive(Debug, Clone)]
pub enum Source {
    InCluster,
    Kubeconfig(PathBuf),
}

/// The watchers and the state they keep.
pub struct KubeSource {
    pub state: Arc<RwLock<KubeState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KubeSource {
    /// Connects (no request is made yet) and starts watching.
    pub async fn start(
        source: &Source,
        scope: &PodScope,
        grace: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Self, KubeError> {
        let config = match source {
            Source::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
            Source::Kubeconfig(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?
            }
        };
        let client = kube::Client::try_from(config).map_err(KubeError::Client)?;
        let state = Arc::new(RwLock::new(KubeState::default()));
        let mut tasks = watch::spawn(&client, scope, &state, cancel);
        tasks.push(tokio::spawn(expire(state.clone(), grace, cancel.clone())));
        Ok(Self { state, tasks })
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Forgets deleted pods once their grace period is over.
async fn expire(
    state: Arc<RwLock<KubeState>>,
    grace: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = crate::identity::now_ms().saturating_sub(grace_ms);
        state.write().unwrap_or_else(std::sync::PoisonError::into_inner).expire(before);
    }
}
