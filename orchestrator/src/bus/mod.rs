//! The NATS bus: everything of the orchestrator that talks to NATS besides the JetStream
//! event log (`log::jetstream`).
//!
//! - `lease`: partition leases in KV `CAIRN_LEASES` (ownership and epochs);
//! - `commands`: commands forwarded to partition owners, and the workers' command entry point.

pub mod commands;
pub mod lease;
