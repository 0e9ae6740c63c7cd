//! cairn's data plane: reads VM disk images, stores them in a content-addressed repository,
//! restores and verifies them. It holds no state between steps and never reads the event log.
//!
//! - [`agent`]: the worker side of jobs: a node's inventory (VM descriptors) and the step
//!   executor with its hypervisor adapters.
//! - [`source`]: where disk bytes come from and go to (raw files, qemu-nbd exports).
//! - [`nbd`]: our NBD client (newstyle, structured replies, block status).
//! - [`repo`]: the repository format and its operations (backup, restore, verify, forget, gc).
//! - [`perms`]: the modes of what cairn keeps at rest (files 0600, folders 0700).

pub mod agent;
pub mod items;
pub mod nbd;
pub mod perms;
pub mod qmp;
pub mod repo;
pub mod source;
