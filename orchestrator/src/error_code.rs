//! The stable, machine-readable codes of refusals: what API clients, the CLI and other
//! orchestrators match on. Each code has one wire name (snake case), used in the HTTP error
//! body `{"error": {"code": ...}}` and in replies between orchestrators; the names never
//! change once released.
//!
//! Owns: the list of codes and their names. Must not: decide which status a code maps to (the
//! refusal's kind does, [`crate::control::ControlError::status`]).

use std::fmt;

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// A stable refusal code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)+
                }
            }

            /// The code with wire name `name`, if there is one.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                match name {
                    $($name => Some(ErrorCode::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

codes! {
    // 400
    /// A malformed body, query, header or command.
    InvalidRequest = "invalid_request",
    /// An id that does not parse.
    InvalidId = "invalid_id",
    /// A target path that is not absolute or climbs out with `..`.
    InvalidPath = "invalid_path",
    /// A group policy that does not validate.
    InvalidPolicy = "invalid_policy",
    /// A request this build or this target cannot carry out (e.g. a recovery kind the
    /// worker does not support).
    Unsupported = "unsupported",
    /// A retention lock longer than the group's retention.
    LockAboveRetention = "lock_above_retention",
    // 404
    /// No such VM.
    UnknownVm = "unknown_vm",
    /// No such job.
    UnknownJob = "unknown_job",
    /// No such protection group.
    UnknownGroup = "unknown_group",
    /// No such recovery point.
    UnknownRp = "unknown_rp",
    /// No such node.
    UnknownNode = "unknown_node",
    /// No such disk of a recovery point.
    UnknownDisk = "unknown_disk",
    /// No such token.
    UnknownToken = "unknown_token",
    /// No such repository on the node.
    UnknownRepository = "unknown_repository",
    /// No route has the request's path.
    NotFound = "not_found",
    // 409
    /// The state changed in a way the request does not allow (generic).
    Conflict = "conflict",
    /// Another instance wrote one of the command's aggregates first; decide again.
    VersionConflict = "version_conflict",
    /// A group of that name exists.
    DuplicateGroup = "duplicate_group",
    /// A token with that id exists.
    DuplicateToken = "duplicate_token",
    /// The VM is protected by another group.
    VmInGroup = "vm_in_group",
    /// The VM is not a member of the group.
    NotAMember = "not_a_member",
    /// The VM is not in its node's inventory.
    VmAbsent = "vm_absent",
    /// The VM moved to a node of another cluster.
    VmMovedAcrossClusters = "vm_moved_across_clusters",
    /// A job of that kind is running for the VM.
    JobRunning = "job_running",
    /// The job has finished.
    JobFinished = "job_finished",
    /// The group's retention lock forbids the change.
    RetentionLocked = "retention_locked",
    /// A token-creating request was repeated with its idempotency key; the secret was shown
    /// only in the first answer.
    SecretShownOnce = "secret_shown_once",
    /// The recovery point is soft-deleted.
    RpDeleted = "rp_deleted",
    /// The recovery point is not soft-deleted.
    RpNotDeleted = "rp_not_deleted",
    /// The recovery point was purged.
    RpPurged = "rp_purged",
    /// A job uses the recovery point.
    RpInUse = "rp_in_use",
    /// The group has no online replica to read.
    NoReplica = "no_replica",
    /// The group has a replica, so the change is refused.
    HasReplica = "has_replica",
    /// The replica disagrees with the primary copy.
    ReplicaInconsistent = "replica_inconsistent",
    // 401 / 403 / 405 / 413
    /// No valid token.
    Unauthenticated = "unauthenticated",
    /// The caller may not do this.
    Forbidden = "forbidden",
    /// The issuer's role may not do this to this target.
    AdminRequired = "admin_required",
    /// The path does not accept the method.
    MethodNotAllowed = "method_not_allowed",
    /// The body is larger than the limit.
    PayloadTooLarge = "payload_too_large",
    // 5xx
    /// The worker could not list the recovery point.
    BrowseFailed = "browse_failed",
    /// The orchestrator failed.
    Internal = "internal",
    /// The orchestrator is shutting down, or not ready.
    Unavailable = "unavailable",
    /// Another orchestrator answered with a code this one does not know (a newer version).
    RemoteError = "remote_error",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    /// A code this build does not know becomes [`ErrorCode::RemoteError`], so a reply from a
    /// newer orchestrator still decodes.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(ErrorCode::from_name(&name).unwrap_or(ErrorCode::RemoteError))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for &code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
            assert_eq!(ErrorCode::from_name(name), Some(code));
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn an_unknown_name_decodes_as_remote_error() {
        assert_eq!(ErrorCode::from_name("from_the_future"), None);
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"from_the_future\"").unwrap(),
            ErrorCode::RemoteError
        );
    }
}
