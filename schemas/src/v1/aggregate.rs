//! Which aggregate (consistency boundary) an event belongs to: a protection group, a VM, a job
//! or a node. Each aggregate has its own version counter in the log.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, JobId, NodeId, TokenId, VmId};

/// The kind of an aggregate, without its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AggregateKind {
    /// A protection group.
    Group,
    /// A VM (data source) and its disks.
    Vm,
    /// A job and its steps.
    Job,
    /// A hypervisor node and its worker.
    Node,
    /// An API token (an identity with a role).
    Token,
}

impl AggregateKind {
    /// The lower-case name used in subjects and logs: `group`, `vm`, `job`, `node`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Group => "group",
            AggregateKind::Vm => "vm",
            AggregateKind::Job => "job",
            AggregateKind::Node => "node",
            AggregateKind::Token => "token",
        }
    }
}

impl fmt::Display for AggregateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One aggregate: its kind and its id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Aggregate {
    /// A protection group.
    Group(GroupId),
    /// A VM (data source).
    Vm(VmId),
    /// A job.
    Job(JobId),
    /// A node.
    Node(NodeId),
    /// An API token.
    Token(TokenId),
}

impl Aggregate {
    /// The kind of this aggregate.
    pub const fn kind(&self) -> AggregateKind {
        match self {
            Aggregate::Group(_) => AggregateKind::Group,
            Aggregate::Vm(_) => AggregateKind::Vm,
            Aggregate::Job(_) => AggregateKind::Job,
            Aggregate::Node(_) => AggregateKind::Node,
            Aggregate::Token(_) => AggregateKind::Token,
        }
    }

    /// The id as text: a hyphenated UUID, or the node name.
    pub fn id_string(&self) -> String {
        match self {
            Aggregate::Group(id) => id.to_string(),
            Aggregate::Vm(id) => id.to_string(),
            Aggregate::Job(id) => id.to_string(),
            Aggregate::Node(id) => id.to_string(),
            Aggregate::Token(id) => id.to_string(),
        }
    }

    /// The id as bytes: 16 UUID bytes, or the node name's UTF-8 bytes.
    pub fn id_bytes(&self) -> &[u8] {
        match self {
            Aggregate::Group(id) => id.as_bytes(),
            Aggregate::Vm(id) => id.as_bytes(),
            Aggregate::Job(id) => id.as_bytes(),
            Aggregate::Node(id) => id.as_str().as_bytes(),
            Aggregate::Token(id) => id.as_bytes(),
        }
    }
}

impl fmt::Display for Aggregate {
    /// `kind/id`, e.g. `job/01890a5d-ac96-774b-bcce-b302099a8057`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind(), self.id_string())
    }
}
