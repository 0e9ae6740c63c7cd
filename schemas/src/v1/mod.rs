//! Format version 1 of every type cairn persists or transmits: events and their envelope, step
//! specs, worker reports, commands, and the domain types inside them. **Frozen.**
//!
//! postcard writes no field names and no variant names: a struct is its fields in declaration
//! order, an enum is a varint variant index followed by the variant's fields. So the layout of
//! every type below is the format, and once events are stored it can never change:
//!
//! - never reorder, rename-by-moving, insert or remove fields or variants, never change a
//!   field's type;
//! - a new enum variant may be added **at the end** of an enum: old bytes still decode, and
//!   an old reader fails cleanly (unknown variant index) on the new variant;
//! - any other change (a new field, a changed type) makes a new format version: copy the
//!   changed types into a new frozen module `v2`, bump [`crate::codec::FORMAT_VERSION`], make
//!   the crate root re-export `v2`, and teach the codec to decode version-1 bytes with these
//!   types and upcast them (`impl From<v1::X> for v2::X`). These types then stay here forever;
//! - no `#[serde(flatten)]`, `untagged`, internally or adjacently tagged enums,
//!   `skip_serializing_if` or `deserialize_any`-based types: postcard cannot decode them.
//!
//! The checked-in corpus (`schemas/tests/corpus/v1/*.bin`) holds encoded samples of every
//! event, spec, report and command variant; `tests/corpus.rs` fails if any of them stops
//! decoding to the same value.
//!
//! Methods on these types (validation, accessors) are behaviour, not format: they may change.

mod aggregate;
mod command;
mod domain;
mod envelope;
mod event;
mod items;
mod policy;
mod step;
mod token;

pub use aggregate::{Aggregate, AggregateKind};
pub use command::{Command, CommandEnvelope};
pub use domain::{
    BackupMode, Consistency, DataSourceState, DiskInfo, FailureClass, ImageFormat, JobKind,
    JobReason, JobState, PowerState, RecoveryOptions, RecoveryTarget, Throttle, VmInventory,
    WaitReason,
};
pub use envelope::Envelope;
pub use event::{CommittedDisk, Event, GroupEvent, JobEvent, NodeEvent, VmEvent};
pub use items::{BrowseEntry, BrowseRequest};
pub use policy::{
    ConsistencyCheckPolicy, ConsistencyCheckWindow, ConsistencyWanted, GroupPolicy, Limits,
    OnlineProtection, PolicyError, ReplicaCreation, Schedule, SyncFrequency, TimeOfDay, Weekdays,
};
pub use step::{
    DiskSource, DiskTracking, PlannedStep, Report, ReportBody, StepKind, StepResult, StepSpec,
    StepWork,
};
pub use token::{Role, TokenEvent};
