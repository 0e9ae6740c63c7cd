//! cairn's data plane: reads VM disk images, stores them in a content-addressed repository,
//! restores and verifies them. It holds no state between steps and never reads the event log.
//!
//! - [`agent`]: the worker side of jobs: a node's inventory (VM descriptors) and the step
//!   executor with its hypervisor adapters.
//! - [`source`]: where disk bytes come from and go to (raw files, qemu-nbd exports).
//! - [`nbd`]: our NBD client (newstyle, structured replies, block status).
//! - [`repo`]: the repository format and its operations (backup, restore, verify, forget, gc).
//! - [`perms`]: the modes of what cairn keeps at rest (files 0600, folders 0700).
//! - [`boundary`]: the node's settings: registered repositories, recovery/seed/image roots,
//!   item limits — what the control plane may ask this worker for.
//! - [`safefs`]: writes below a root through directory descriptors (`openat2`).

pub mod agent;
pub mod boundary;
pub mod items;
pub mod nbd;
pub mod perms;
pub mod qmp;
pub mod repo;
pub mod safefs;
pub mod source;
