//! Types shared by cairn's control plane (orchestrator) and data plane (worker): ids, events,
//! commands, step specs and worker reports, and their versioned binary codec.
//!
//! This crate does no IO. It knows nothing of tokio, NATS, sled, HTTP or files; serde and
//! postcard only.
