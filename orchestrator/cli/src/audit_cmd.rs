//! `cairn audit verify --log DIR`: the audit of a sled event log without a server, for a log
//! whose `cairn up` is stopped (or refuses to start because the log is damaged). It opens the
//! log without writing to it, walks the keyed chain with the given audit key, and checks the
//! log against a checkpoint folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_orchestrator::audit::verify::chain_report;
use cairn_orchestrator::audit::{CheckpointTrust, FolderSink, keys, sink};
use cairn_orchestrator::log::{SledLog, SledLogConfig};
use cairn_orchestrator::views::AuditReport;

/// Verifies the sled log at `log` (see the module docs).
pub fn verify_offline(
    log: &Path,
    audit_key: Option<&Path>,
    checkpoints: Option<&Path>,
    trust_keys: &[PathBuf],
) -> Result<AuditReport> {
    let key = audit_key.map(keys::read_audit_key).transpose()?;
    let mut extra_keys = Vec::new();
    for path in trust_keys {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = sink::read_public_key(path, &name)
            .map_err(|reason| anyhow::anyhow!("--trust-key {}: {reason}", path.display()))?;
        extra_keys.push(key);
    }
    if !log.join("db").exists() && !log.join("conf").exists() {
        anyhow::bail!("--log {}: no sled event log there", log.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let log = SledLog::open_for_audit(SledLogConfig::new(log).with_audit_key(key))
            .with_context(|| format!("opening the event log {}", log.display()))?;
        let mut report = chain_report(&log)
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        if let Some(dir) = checkpoints {
            let trust = CheckpointTrust {
                sink: FolderSink::new(dir),
                trust_sink_keys: extra_keys.is_empty(),
                extra_keys,
            };
            let checked = trust
                .verify(&log)
                .await
                .map_err(|err| anyhow::anyhow!(err))?;
            report.ok &= checked.ok;
            report.checkpoints = Some(checked);
        }
        Ok(report)
    })
}
