//! The contract between the orchestrator's engine and its front ends (HTTP API, in-process
//! callers): reads from projections and commands that go through `decide`.
//!
//! The API module is generic over [`Control`], so it can be tested against a fake and served
//! by any orchestrator instance (the embedded one of `cairn up`, or a distributed one that
//! forwards commands to the owner of a partition).

use std::future::Future;
use std::pin::Pin;

use cairn_schemas::Command;

use crate::auth::Principal;
pub use crate::error_code::ErrorCode;
use crate::views::{
    Accepted, AlertView, AuditReport, BrowseView, CalendarDayView, CapacityView, EventView,
    GroupDetailView, GroupView, JobView, NodeView, RpView, TokenView, VmView,
};

/// Why a token was not accepted (401 `unauthenticated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    #[error("the token is not known to this orchestrator")]
    Unknown,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token expired")]
    Expired,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a command or query was refused. Client faults carry a stable `code` and map to 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The thing named does not exist (404). Codes: `unknown_vm`, `unknown_job`, `unknown_group`,
    /// `unknown_rp`, `unknown_node`.
    #[error("{message}")]
    NotFound { code: ErrorCode, message: String },
    /// The request is valid but conflicts with the current state (409). Codes:
    /// `duplicate_group`, `job_running`, `job_finished`, `vm_in_group`, `conflict`,
    /// `retention_locked`, `rp_deleted`, `rp_not_deleted`, `rp_purged`, `rp_in_use`.
    #[error("{message}")]
    Conflict { code: ErrorCode, message: String },
    /// The request is malformed or invalid (400). Codes: `invalid_request`, `invalid_policy`,
    /// `invalid_id`, `invalid_path`.
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    /// The caller may not do this (403). Codes: `forbidden` (a node's command about another
    /// node, or a command no node may send), `admin_required` (the issuer's role may not do
    /// this to this target, whatever its route allows).
    #[error("{message}")]
    Forbidden { code: ErrorCode, message: String },
    /// The orchestrator failed (500); the message is for the log, not a user's fault.
    #[error("internal error: {0}")]
    Internal(String),
    /// The orchestrator is shutting down or not ready (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl ControlError {
    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::NotFound { .. } => 404,
            ControlError::Conflict { .. } => 409,
            ControlError::Invalid { .. } => 400,
            ControlError::Forbidden { .. } => 403,
            ControlError::Internal(_) => 500,
            ControlError::Unavailable(_) => 503,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ControlError::NotFound { code, .. }
            | ControlError::Conflict { code, .. }
            | ControlError::Invalid { code, .. }
            | ControlError::Forbidden { code, .. } => *code,
            ControlError::Internal(_) => ErrorCode::Internal,
            ControlError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// What the HTTP API needs from an orchestrator.
pub trait Control: Send + Sync + 'static {
    fn vms(&self) -> Vec<VmView>;
    fn groups(&self) -> Vec<GroupView>;
    fn jobs(&self) -> Vec<JobView>;
    fn job(&self, job: &str) -> Result<JobView, ControlError>;
    fn recovery_points(&self, vm: &str) -> Result<Vec<RpView>, ControlError>;
    fn nodes(&self) -> Vec<NodeView>;

    /// Runs a command through `decide` and appends its events; `actor` is recorded on them.
    /// With an `id` (from the client's `Idempotency-Key`) a repeat of the command returns the
    /// first answer, marked [`Accepted::replayed`], and appends nothing.
    fn submit(
        &self,
        actor: String,
        id: Option<cairn_schemas::CommandId>,
        command: Command,
    ) -> BoxFuture<'_, Result<Accepted, ControlError>>;

    /// Events with sequence ≥ `from_seq`, at most `limit`.
    fn events(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<EventView>, ControlError>>;
    /// Resolves when an event with sequence ≥ `from_seq` exists or `timeout_ms` passed.
    fn wait_for_events(&self, from_seq: u64, timeout_ms: u64) -> BoxFuture<'_, ()>;
    /// Walks the hash chain of the whole log.
    fn audit_verify(&self) -> BoxFuture<'_, Result<AuditReport, ControlError>>;

    /// New ids for commands that create things (the API chooses ids so a retried request can
    /// be made idempotent).
    fn new_job_id(&self) -> cairn_schemas::JobId;
    fn new_group_id(&self) -> cairn_schemas::GroupId;
    fn new_command_id(&self) -> cairn_schemas::CommandId;

    /// The repository a new protection group writes to when its request names none. The
    /// default, empty, makes such a request fail validation (`repository must not be empty`).
    fn default_repository(&self) -> String {
        String::new()
    }

    /// The zone of schedules and, by default, of recovery throttles' work hours
    /// (`--timezone`). The default is UTC.
    fn timezone(&self) -> crate::policy::tz::TimeZone {
        crate::policy::tz::TimeZone::UTC
    }

    /// The principal of the live token whose secret hashes to `secret_hash`. App owners'
    /// scopes come resolved: the VMs listed and the current members of the groups listed.
    fn authenticate(&self, secret_hash: &[u8; 32]) -> Result<Principal, AuthRefusal>;
    /// Every token, live or not (never a secret).
    fn tokens(&self) -> Vec<TokenView>;
    /// A new id for a token.
    fn new_token_id(&self) -> cairn_schemas::TokenId;

    /// The folders below which `node` lets app owners write recoveries (from its worker's
    /// registration); none by default.
    fn app_owner_roots(&self, _node: &cairn_schemas::NodeId) -> Vec<String> {
        Vec::new()
    }

    /// One group with its policy, next runs and members' retention.
    fn group(&self, _group: &str) -> Result<GroupDetailView, ControlError> {
        Err(ControlError::Unavailable(
            "groups' details are not served here".into(),
        ))
    }
    /// The group's disk allocation review.
    fn group_plan(&self, _group: &str) -> Result<CapacityView, ControlError> {
        Err(ControlError::Unavailable(
            "disk allocation reviews are not served here".into(),
        ))
    }
    /// Alerts: active ones, and with `all` resolved ones too.
    fn alerts(&self, _all: bool) -> Vec<AlertView> {
        Vec::new()
    }
    /// Recovery points per day of a VM.
    fn calendar(&self, _vm: &str) -> Result<Vec<CalendarDayView>, ControlError> {
        Err(ControlError::Unavailable(
            "calendars are not served here".into(),
        ))
    }
    /// Lists `path` inside disk `disk` (default: the first) of recovery point `rp` of `vm`,
    /// asking the worker of the VM's node (item-level recovery). The default: unavailable.
    fn browse(
        &self,
        _vm: &str,
        _rp: &str,
        _disk: Option<&str>,
        _path: &str,
    ) -> BoxFuture<'_, Result<BrowseView, ControlError>> {
        Box::pin(async {
            Err(ControlError::Unavailable(
                "this orchestrator cannot browse recovery points".into(),
            ))
        })
    }
}
