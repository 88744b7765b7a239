//! Deployment manifests (filled below).
