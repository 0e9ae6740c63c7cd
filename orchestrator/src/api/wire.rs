//! The API's request bodies, query strings and the few response types that are not read
//! models (those are in [`crate::views`]), plus the pure checks that turn a request into
//! command fields. Shared with the CLI client, which sends and reads the same types.
//!
//! Request bodies and query strings refuse unknown fields (`deny_unknown_fields`), so a typo
//! is an error that names the field instead of a setting silently ignored. Fields are only
//! ever added, as optional ones, so older clients keep working.

use std::path::{Component, Path};

use cairn_schemas::{BackupMode, GroupPolicy, SyncFrequency};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::views::EventView;

/// `POST /v1/groups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// Display name, 1-128 characters, unique among groups.
    pub name: String,
    /// Member VM ids.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Recovery points are kept this many days (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    /// Synchronization frequency: `15m`, `1h`, `1440m`, `1d`, or `before-recovery-point`
    /// (default `15m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<String>,
    /// Repository name (default: the orchestrator's default repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The whole policy; when given, `retention_days`, `sync` and `repository` must not be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::views::PolicyView>,
}

/// `POST /v1/vms/{vm}/seed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    /// Absolute path of the seed folder (written by `cairn seed export`) on the VM's node.
    pub seed: String,
}

/// `POST /v1/vms/{vm}/recovery-points/delete` and `.../undelete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpsRequest {
    /// Recovery point ids.
    pub rps: Vec<String>,
}

/// `POST /v1/groups/{group}/delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteGroupRequest {
    /// Also soft-delete the members' recovery points.
    pub delete_recovery_points: bool,
}

/// `POST /v1/groups/{group}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersRequest {
    /// VMs (ids) to protect in the group.
    #[serde(default)]
    pub add: Vec<String>,
    /// Members (ids) to stop protecting.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Also soft-delete the removed members' recovery points (needs the right `delete`).
    #[serde(default)]
    pub delete_recovery_points: bool,
}

/// `POST /v1/groups/{group}/retention-lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionLockRequest {
    /// The lock in days (0 = none).
    pub days: u32,
}

/// `POST /v1/groups/{group}/soft-delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftDeleteRequest {
    /// Days deleted recovery points stay restorable (1-90).
    pub days: u32,
}

/// `GET /v1/alerts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    /// Also resolved alerts.
    #[serde(default)]
    pub all: Option<bool>,
}

/// A policy from its JSON form, with `online` carried over and empty `repository` replaced
/// by `default_repository`, validated.
pub fn policy_from_view(
    view: &crate::views::PolicyView,
    online: Option<cairn_schemas::OnlineProtection>,
    default_repository: &str,
) -> Result<GroupPolicy, Error> {
    let mut policy = view.to_policy(online).map_err(Error::invalid_policy)?;
    if policy.repository.is_empty() {
        policy.repository = default_repository.to_owned();
    }
    policy
        .validate()
        .map_err(|err| Error::invalid_policy(err.to_string()))?;
    Ok(policy)
}

/// Longest group name accepted, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 128;

impl CreateGroupRequest {
    /// The group's policy: the defaults of [`GroupPolicy::with_defaults`] on the named
    /// repository (or `default_repository`), with the request's retention and sync, validated.
    pub fn policy(&self, default_repository: &str) -> Result<GroupPolicy, Error> {
        if let Some(view) = &self.policy {
            if self.retention_days.is_some() || self.sync.is_some() || self.repository.is_some() {
                return Err(Error::invalid_policy(
                    "give either policy or retention_days/sync/repository, not both",
                ));
            }
            return policy_from_view(view, None, default_repository);
        }
        let repository = self.repository.as_deref().unwrap_or(default_repository);
        let mut policy = GroupPolicy::with_defaults(repository);
        if let Some(days) = self.retention_days {
            policy.retention_days = u16::try_from(days).map_err(|_| {
                Error::invalid_policy(format!(
                    "retention_days {days} is out of range, use 1 to {}",
                    u16::MAX
                ))
            })?;
        }
        if let Some(sync) = &self.sync {
            policy.sync = parse_sync(sync)?;
        }
        policy
            .validate()
            .map_err(|err| Error::invalid_policy(err.to_string()))?;
        Ok(policy)
    }

    /// Checks the name: 1-128 characters, no control characters, no surrounding blanks.
    pub fn check_name(&self) -> Result<(), Error> {
        let name = &self.name;
        let n_chars = name.chars().count();
        if n_chars == 0 || n_chars > MAX_GROUP_NAME_CHARS {
            return Err(Error::invalid_request(format!(
                "name must be 1 to {MAX_GROUP_NAME_CHARS} characters long, not {n_chars}"
            )));
        }
        if name.chars().any(char::is_control) || name.trim() != name {
            return Err(Error::invalid_request(format!(
                "name {name:?} must not contain control characters or start or end with blanks"
            )));
        }
        Ok(())
    }
}

/// Parses a synchronization frequency: `before-recovery-point`, or a number of minutes
/// (`15m`, `15`), hours (`1h`) or days (`1d`). Whether the interval is one that a policy
/// allows is [`GroupPolicy::validate`]'s business, so its message lists the allowed ones.
pub fn parse_sync(text: &str) -> Result<SyncFrequency, Error> {
    let bad = || {
        Error::invalid_policy(format!(
            "sync {text:?} is not a frequency; use e.g. 15m, 1h, 1h30m, 1d or before-recovery-point"
        ))
    };
    let text_trimmed = text.trim();
    if text_trimmed == "before-recovery-point" {
        return Ok(SyncFrequency::JustBeforeRecoveryPoint);
    }
    // A bare number counts minutes; anything else is a humantime duration (`15m`, `1h30m`,
    // `1d`) of whole minutes.
    let minutes: u64 = if text_trimmed.bytes().all(|b| b.is_ascii_digit()) {
        text_trimmed.parse().map_err(|_| bad())?
    } else {
        let duration = humantime::parse_duration(text_trimmed).map_err(|_| bad())?;
        if duration.as_nanos() % 60_000_000_000 != 0 {
            return Err(bad());
        }
        duration.as_secs() / 60
    };
    let minutes = u16::try_from(minutes).map_err(|_| bad())?;
    Ok(SyncFrequency::EveryMinutes(minutes))
}

/// The text form of a synchronization frequency that [`parse_sync`] reads back: `60m`,
/// `before-recovery-point`.
pub fn format_sync(sync: SyncFrequency) -> String {
    match sync {
        SyncFrequency::EveryMinutes(minutes) => format!("{minutes}m"),
        SyncFrequency::JustBeforeRecoveryPoint => "before-recovery-point".to_owned(),
    }
}

/// How a backup reads its disks, as the API spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupModeWire {
    /// Only changed blocks (the default).
    #[default]
    Incremental,
    /// Everything read, only changes stored.
    ExpressFull,
}

impl From<BackupModeWire> for BackupMode {
    fn from(mode: BackupModeWire) -> Self {
        match mode {
            BackupModeWire::Incremental => BackupMode::Incremental,
            BackupModeWire::ExpressFull => BackupMode::ExpressFull,
        }
    }
}

/// `POST /v1/vms/{vm}/backup` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// `incremental` (default) or `express-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BackupModeWire>,
}

/// `POST /v1/vms/{vm}/restore`: copy a recovery point's disks into a folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The recovery point id.
    pub rp: String,
    /// Absolute folder on the node to write the disk images into.
    pub to: String,
    /// Node that writes (default: the node that hosts the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Longest accepted target path, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Checks a restore target folder: absolute, no `..` component, no NUL or control
/// characters, at most [`MAX_PATH_BYTES`]. The worker checks again on its node; this check
/// gives the caller a clear error before a job exists.
pub fn check_target_path(field: &str, path: &str) -> Result<(), Error> {
    if path.len() > MAX_PATH_BYTES {
        return Err(Error::invalid_path(format!(
            "{field} is {} bytes long, at most {MAX_PATH_BYTES} are allowed",
            path.len()
        )));
    }
    if path.chars().any(char::is_control) {
        return Err(Error::invalid_path(format!(
            "{field} {path:?} contains control characters"
        )));
    }
    let parsed = Path::new(path);
    if !parsed.is_absolute() {
        return Err(Error::invalid_path(format!(
            "{field} {path:?} is not an absolute path"
        )));
    }
    if parsed.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_path(format!(
            "{field} {path:?} must not contain '..'"
        )));
    }
    Ok(())
}

/// `POST /v1/jobs/{job}/cancel` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why, for humans (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest cancel reason accepted, in characters.
pub const MAX_REASON_CHARS: usize = 1024;

/// Query of `GET /v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// Only jobs in this state (`Queued`, `Running`, `Succeeded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Only jobs of this VM (id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// At most this many jobs (default [`DEFAULT_JOBS_LIMIT`], at most [`MAX_JOBS_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// Jobs returned by `GET /v1/jobs` without `limit`.
pub const DEFAULT_JOBS_LIMIT: usize = 100;
/// Largest `limit` of `GET /v1/jobs`.
pub const MAX_JOBS_LIMIT: usize = 10_000;

/// The job states a `state` filter may name.
pub const JOB_STATES: [&str; 7] = [
    "Scheduled",
    "Queued",
    "Running",
    "Retrying",
    "Succeeded",
    "Failed",
    "Cancelled",
];

/// Query of `GET /v1/events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// First sequence number wanted (default 0: from the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// At most this many events (default [`DEFAULT_EVENTS_LIMIT`], at most
    /// [`MAX_EVENTS_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// When no event ≥ `from` exists yet, wait up to this long for one (milliseconds; cut to
    /// 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// Events returned by `GET /v1/events` without `limit`.
pub const DEFAULT_EVENTS_LIMIT: usize = 100;
/// Largest `limit` of `GET /v1/events`.
pub const MAX_EVENTS_LIMIT: usize = 1000;

/// Answer of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    /// Events in sequence order.
    pub events: Vec<EventView>,
    /// The `from` of the next request: one past the last event returned, or the request's
    /// `from` when none was.
    pub next_from: u64,
}

/// Answer of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `unknown_vm`, `invalid_request`.
    pub code: String,
    /// What was wrong, with which value, for humans.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_code::ErrorCode;

    fn code(err: Error) -> ErrorCode {
        err.code()
    }

    #[test]
    fn sync_frequencies_parse() {
        let cases: [(&str, Option<SyncFrequency>); 16] = [
            ("1h30m", Some(SyncFrequency::EveryMinutes(90))),
            ("15min", Some(SyncFrequency::EveryMinutes(15))),
            ("120s", Some(SyncFrequency::EveryMinutes(2))),
            ("90s", None),
            ("15m", Some(SyncFrequency::EveryMinutes(15))),
            ("60m", Some(SyncFrequency::EveryMinutes(60))),
            ("1h", Some(SyncFrequency::EveryMinutes(60))),
            ("12h", Some(SyncFrequency::EveryMinutes(720))),
            ("1d", Some(SyncFrequency::EveryMinutes(1440))),
            ("30", Some(SyncFrequency::EveryMinutes(30))),
            (
                "before-recovery-point",
                Some(SyncFrequency::JustBeforeRecoveryPoint),
            ),
            ("", None),
            ("h", None),
            ("15 parsecs", None),
            ("-15m", None),
            ("99999h", None),
        ];
        for (text, expected) in cases {
            match expected {
                Some(sync) => {
                    assert_eq!(parse_sync(text), Ok(sync), "{text}");
                    assert_eq!(parse_sync(&format_sync(sync)), Ok(sync));
                }
                None => {
                    let err = parse_sync(text).unwrap_err();
                    assert_eq!(err.code(), ErrorCode::InvalidPolicy, "{text}");
                    assert!(err.to_string().contains("sync"), "{err}");
                }
            }
        }
    }

    #[test]
    fn policy_takes_retention_sync_and_repository() {
        let request = CreateGroupRequest {
            name: "web".into(),
            retention_days: Some(14),
            sync: Some("1h".into()),
            ..Default::default()
        };
        let policy = request.policy("local").unwrap();
        assert_eq!(policy.retention_days, 14);
        assert_eq!(policy.sync, SyncFrequency::EveryMinutes(60));
        assert_eq!(policy.repository, "local");
        let named = CreateGroupRequest {
            repository: Some("offsite".into()),
            ..request.clone()
        };
        assert_eq!(named.policy("local").unwrap().repository, "offsite");
    }

    #[test]
    fn bad_policies_name_their_field() {
        let base = CreateGroupRequest {
            name: "web".into(),
            ..Default::default()
        };
        let cases = [
            (
                CreateGroupRequest {
                    retention_days: Some(0),
                    ..base.clone()
                },
                "local",
                "retention_days",
            ),
            (
                CreateGroupRequest {
                    retention_days: Some(70_000),
                    ..base.clone()
                },
                "local",
                "retention_days",
            ),
            (
                CreateGroupRequest {
                    sync: Some("20m".into()),
                    ..base.clone()
                },
                "local",
                "sync",
            ),
            (base.clone(), "", "repository"),
        ];
        for (request, default_repository, field) in cases {
            let err = request.policy(default_repository).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidPolicy);
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn group_names_are_checked() {
        let named = |name: &str| CreateGroupRequest {
            name: name.into(),
            ..Default::default()
        };
        assert!(named("web servers").check_name().is_ok());
        assert!(named(&"n".repeat(128)).check_name().is_ok());
        for bad in ["", " web", "web\n", &"n".repeat(129)] {
            assert_eq!(
                code(named(bad).check_name().unwrap_err()),
                ErrorCode::InvalidRequest,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn target_paths_are_checked() {
        assert!(check_target_path("to", "/srv/restore").is_ok());
        assert!(check_target_path("to", "/srv/./restore/").is_ok());
        for bad in [
            "",
            "srv/restore",
            "./restore",
            "/srv/../etc",
            "/srv/restore/..",
            "/srv/\0x",
            &format!("/{}", "a".repeat(MAX_PATH_BYTES)),
        ] {
            let err = check_target_path("to", bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidPath, "{bad:?}");
            assert!(err.to_string().starts_with("to "), "{err}");
        }
    }

    #[test]
    fn backup_modes_are_kebab_case() {
        let request: BackupRequest = serde_json::from_str(r#"{"mode":"express-full"}"#).unwrap();
        assert_eq!(request.mode, Some(BackupModeWire::ExpressFull));
        assert_eq!(
            BackupMode::from(request.mode.unwrap_or_default()),
            BackupMode::ExpressFull
        );
        assert!(serde_json::from_str::<BackupRequest>(r#"{"mode":"full"}"#).is_err());
    }
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// `[A-Za-z0-9._-]{1,64}`, unique among live tokens.
    pub name: String,
    /// `admin`, `operator`, `viewer` or `app-owner`.
    pub role: String,
    /// An app owner's VMs (ids).
    #[serde(default)]
    pub vms: Vec<String>,
    /// An app owner's groups (ids).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Lifetime in seconds; absent: the token does not expire.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}
