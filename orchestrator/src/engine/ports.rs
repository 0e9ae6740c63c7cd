//! The engine's ports: what it needs from the outside world, implemented by the in-process
//! bus of `cairn up` and by the NATS bus (`crate::bus`). Kept apart from the engine's main
//! loop so the bus code depends on these traits only.

use cairn_schemas::{BrowseEntry, BrowseRequest, Command, CommandId, JobId, NodeId, StepSpec};

use crate::control::{BoxFuture, ControlError};
use crate::views::Accepted;

/// Where dispatched steps go: the in-process bus of `cairn up`, or NATS.
pub trait StepSink: Send + Sync {
    fn dispatch(&self, spec: StepSpec);
    /// Asks the workers to stop the running steps of `job` (it was cancelled).
    fn cancel(&self, _job: JobId) {}
    /// Asks the worker of `node` to list a folder inside a recovery point (item-level
    /// recovery). A quick query on the same seam as steps; nothing is logged. The default
    /// answers that no worker can be asked.
    fn browse(
        &self,
        node: NodeId,
        _request: BrowseRequest,
    ) -> BoxFuture<'static, Result<Vec<BrowseEntry>, String>> {
        Box::pin(async move { Err(format!("no worker of node {node} can be asked to browse")) })
    }
}

/// Where commands for partitions this instance does not own go (distributed: a NATS request
/// to the owner). Without one, such commands are refused as unavailable.
pub trait CommandRouter: Send + Sync {
    /// Submits `command` as `actor` to the owner of `partition`, under `id` (the client's,
    /// for an idempotent command) or a fresh id.
    fn forward(
        &self,
        partition: u16,
        actor: String,
        id: Option<CommandId>,
        command: Command,
    ) -> BoxFuture<'static, Result<Accepted, ControlError>>;
}
