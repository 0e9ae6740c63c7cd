//! The test fault hook: delays at the start of chosen step kinds, so end-to-end crash tests can
//! `kill -9` a worker (or an orchestrator) while a given step is running.
//!
//! Set [`FAULT_DELAY_ENV`] (`CAIRN_FAULT_STEP_DELAY_MS`) to a comma-separated list of
//! `<StepKind>=<milliseconds>`, e.g. `Snapshot=3000,CommitRecoveryPoint=3000,Transfer=0`. Kinds
//! are `Snapshot`, `Transfer`, `ReleaseSnapshot`, `CommitRecoveryPoint`, `Restore`,
//! `VerifyDisk`, `CheckDisk`, `Prune`, `CollectGarbage`, `ImportSeed`, `PrepareRecovery`,
//! `FinishRecovery` and `ExtractItems` (any case);
//! spaces around items are ignored; an empty value means no delays. A malformed value makes
//! [`super::Agent::new`] fail rather than be ignored, so a crash test never runs without the
//! delay it asked for. This is a test hook: production workers leave the variable unset.

use std::time::Duration;

use cairn_schemas::v1::StepWork;

/// The environment variable of the hook.
pub const FAULT_DELAY_ENV: &str = "CAIRN_FAULT_STEP_DELAY_MS";

/// Longest accepted delay: one hour.
const MAX_DELAY_MS: u64 = 3_600_000;

/// The kinds of step a delay may apply to.
const KINDS: [&str; 13] = [
    "Snapshot",
    "Transfer",
    "ReleaseSnapshot",
    "CommitRecoveryPoint",
    "Restore",
    "VerifyDisk",
    "CheckDisk",
    "Prune",
    "CollectGarbage",
    "ImportSeed",
    "PrepareRecovery",
    "FinishRecovery",
    "ExtractItems",
];

/// Why a fault hook value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {FAULT_DELAY_ENV} value {value:?}: {reason}")]
pub struct FaultHookError {
    /// The whole value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Delays per step kind; the default has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultDelays {
    /// `(index into KINDS, delay)`.
    delays: Vec<(usize, Duration)>,
}

impl FaultDelays {
    /// Parses the hook's syntax (see the module docs).
    pub fn parse(value: &str) -> Result<FaultDelays, FaultHookError> {
        let bad = |reason: String| FaultHookError {
            value: value.to_owned(),
            reason,
        };
        let mut delays = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (kind, ms) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("{item:?} is not <StepKind>=<milliseconds>")))?;
            let kind = kind.trim();
            let index = KINDS
                .iter()
                .position(|k| k.eq_ignore_ascii_case(kind))
                .ok_or_else(|| {
                    bad(format!(
                        "unknown step kind {kind:?}; expected one of {}",
                        KINDS.join(", ")
                    ))
                })?;
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| bad(format!("{:?} is not a number of milliseconds", ms.trim())))?;
            if ms > MAX_DELAY_MS {
                return Err(bad(format!("{ms} ms is more than {MAX_DELAY_MS} ms")));
            }
            delays.retain(|&(i, _)| i != index);
            delays.push((index, Duration::from_millis(ms)));
        }
        Ok(FaultDelays { delays })
    }

    /// Reads [`FAULT_DELAY_ENV`]; unset means no delays.
    pub fn from_env() -> Result<FaultDelays, FaultHookError> {
        match std::env::var(FAULT_DELAY_ENV) {
            Ok(value) => FaultDelays::parse(&value),
            Err(std::env::VarError::NotPresent) => Ok(FaultDelays::default()),
            Err(std::env::VarError::NotUnicode(raw)) => Err(FaultHookError {
                value: raw.to_string_lossy().into_owned(),
                reason: "not UTF-8".into(),
            }),
        }
    }

    /// The delay before the work of a step, if any.
    pub fn delay_for(&self, work: &StepWork) -> Option<Duration> {
        let index = match work {
            StepWork::Snapshot { .. } => 0,
            StepWork::Transfer { .. } => 1,
            StepWork::ReleaseSnapshot { .. } => 2,
            StepWork::CommitRecoveryPoint { .. } => 3,
            StepWork::Restore { .. }
            | StepWork::RestoreDisk { .. }
            | StepWork::RestoreDiskInZone { .. } => 4,
            StepWork::VerifyDisk { .. } => 5,
            StepWork::CheckDisk { .. } => 6,
            StepWork::Prune { .. } => 7,
            StepWork::CollectGarbage { .. } => 8,
            StepWork::ImportSeed { .. } => 9,
            StepWork::PrepareRecovery { .. } => 10,
            StepWork::FinishRecovery { .. } => 11,
            StepWork::ExtractItems { .. } => 12,
        };
        self.delays
            .iter()
            .find(|&&(i, _)| i == index)
            .map(|&(_, delay)| delay)
            .filter(|delay| !delay.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> StepWork {
        StepWork::ReleaseSnapshot {
            snapshot: String::new(),
        }
    }

    #[test]
    fn the_documented_syntax_parses() {
        let delays =
            FaultDelays::parse("Snapshot=3000, commitrecoverypoint = 250 ,Transfer=0,").unwrap();
        let snapshot = StepWork::Snapshot {
            vm_name: "a".into(),
            disks: vec![],
            consistency: cairn_schemas::v1::ConsistencyWanted::CrashOnly,
        };
        assert_eq!(
            delays.delay_for(&snapshot),
            Some(Duration::from_millis(3000))
        );
        assert_eq!(delays.delay_for(&release()), None);
        assert_eq!(FaultDelays::parse("").unwrap(), FaultDelays::default());
        let later_wins = FaultDelays::parse("ReleaseSnapshot=1,ReleaseSnapshot=2").unwrap();
        assert_eq!(
            later_wins.delay_for(&release()),
            Some(Duration::from_millis(2))
        );
    }

    #[test]
    fn malformed_values_are_refused_by_name() {
        for (value, wanted) in [
            ("Snapshot", "is not <StepKind>=<milliseconds>"),
            ("Snap=1", "unknown step kind \"Snap\""),
            ("Snapshot=soon", "\"soon\" is not a number"),
            ("Snapshot=-1", "is not a number"),
            ("Snapshot=3600001", "more than"),
        ] {
            let err = FaultDelays::parse(value).unwrap_err().to_string();
            assert!(err.contains(wanted), "{value}: {err}");
            assert!(err.contains(FAULT_DELAY_ENV), "{err}");
        }
    }
}
