//! Types shared by cairn's control plane (orchestrator) and data plane (worker): ids, events,
//! commands, step specs and worker reports, and their versioned binary codec.
//!
//! This crate does no IO. It knows nothing of tokio, NATS, sled, HTTP or files; serde and
//! postcard only (with uuid and thiserror). `tests/no_io.rs` keeps it that way.
//!
//! - [`ids`]: UUID v7 ids built from caller-supplied time and randomness, validated names;
//! - [`v1`]: format version 1 of every persisted or transmitted type, frozen; the crate root
//!   re-exports the current version, so callers write `cairn_schemas::JobEvent`;
//! - [`codec`]: version byte + postcard, with upcasting of old versions on decode;
//! - [`subjects`]: NATS subject names and the partition function.

pub mod codec;
pub mod ids;
pub mod subjects;
pub mod v1;

pub use codec::{
    CodecError, FORMAT_VERSION, decode, decode_command, decode_report, decode_spec, encode,
    encode_command, encode_report, encode_spec,
};
pub use ids::{
    CommandId, DiskId, EventId, GroupId, IdError, JobId, NodeId, RecoveryPointId, StepId, TokenId,
    VmId,
};
pub use v1::*;
