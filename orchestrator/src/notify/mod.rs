//! Notifications when a recovery ends: an e-mail through SMTP ([`smtp`]) and a JSON POST to an
//! HTTPS webhook ([`webhook`]), as MABS's "send an e-mail when the recovery completes".
//! A webhook goes only to public addresses unless the operator allow-lists the host, the
//! address or its network ([`address`]); a refused webhook is a failed delivery, recorded like
//! any other, and not retried.
//!
//! [`notice`] is pure: it turns a finished job in the projections into the text and JSON that
//! go out. [`Notifier::deliver`] does the IO, with a few retries; the engine service calls it
//! only for jobs whose end is durable in the log, and records each outcome as a
//! `NotificationSent` event, so a notification interrupted by a crash is sent again after the
//! restart (at least once; a receiver may see a duplicate, keyed by `job`).
//!
//! Must not: read the event log or the projections itself, or block the engine's loop.

pub mod address;
pub mod smtp;
pub mod webhook;

use std::time::Duration;

use cairn_schemas::{JobState, RecoveryTarget};
use serde_json::json;

use crate::engine::read::format_name;
use crate::engine::state::{Job, State};

/// Errors of one delivery attempt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no SMTP server is configured (cairn up --smtp HOST:PORT)")]
    NoSmtpServer,
    #[error("{0}")]
    Smtp(#[from] smtp::Error),
    #[error("{0}")]
    Webhook(#[from] webhook::Error),
    #[error("unknown notification target {0:?}")]
    UnknownTarget(String),
    #[error("no answer within the timeout")]
    Timeout,
}

impl Error {
    /// Whether another attempt may succeed.
    fn retryable(&self) -> bool {
        match self {
            Error::NoSmtpServer | Error::UnknownTarget(_) => false,
            Error::Timeout => true,
            Error::Smtp(e) => e.retryable(),
            Error::Webhook(e) => e.retryable(),
        }
    }
}

/// Where e-mail goes out, and what webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    /// `host:port` of the SMTP relay; `None` = e-mail notifications fail with a clear reason.
    pub smtp_server: Option<String>,
    /// Envelope and header sender.
    pub from: String,
    /// Name this host gives in `EHLO`.
    pub hostname: String,
    /// Attempts per target (at least 1).
    pub attempts: u32,
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Hosts, addresses and networks webhooks may reach although they are not public.
    pub webhook_allow: address::AllowList,
    /// Extra CA certificates for webhooks' servers ([`webhook::read_ca_file`]).
    pub webhook_roots: Vec<webhook::CertificateDer<'static>>,
}

impl NotifyConfig {
    pub fn new(smtp_server: Option<String>, from: String) -> NotifyConfig {
        NotifyConfig {
            smtp_server,
            from,
            hostname: "cairn.localdomain".into(),
            attempts: 3,
            timeout: Duration::from_secs(10),
            webhook_allow: address::AllowList::default(),
            webhook_roots: Vec::new(),
        }
    }
}

/// What a notification says.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub subject: String,
    pub text: String,
    pub json: serde_json::Value,
}

/// The text of a finished recovery job's notification.
pub fn notice(state: &State, job: &Job) -> Notice {
    let vm_name = state
        .vms
        .get(&job.vm)
        .map_or_else(|| job.vm.to_string(), |v| v.name.clone());
    let (rp, target) = match &job.kind {
        cairn_schemas::JobKind::Recovery { rp, target } => (Some(*rp), Some(target)),
        _ => (None, None),
    };
    let recovery = state.recoveries.get(&job.id);
    let outcome = match job.state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "was cancelled",
        _ => "is still running",
    };
    let target_text = target.map(describe_target).unwrap_or_default();
    let note = target.and_then(|t| recovery_note(t, job.state));
    let bytes_written = recovery.map_or(0, |r| r.bytes_written);
    let subject = format!("cairn: recovery of VM {vm_name} {outcome}");
    let mut text = format!(
        "Recovery job {} {outcome}.\n\nVM:              {vm_name} ({})\nRecovery point:  {}\nTarget:          {target_text}\nBytes written:   {bytes_written}\n",
        job.id,
        job.vm,
        rp.map(|r| r.to_string()).unwrap_or_default(),
    );
    if let (Some(start), Some(end)) = (job.started_at, job.finished_at) {
        text.push_str(&format!(
            "Duration:        {:.1} s\n",
            end.saturating_sub(start) as f64 / 1000.0
        ));
    }
    if let Some(error) = &job.error {
        text.push_str(&format!("Error:           {error}\n"));
    }
    if let Some(written) = recovery.and_then(|r| r.written.clone()) {
        text.push_str(&format!("Written:         {written}\n"));
    }
    if let Some(note) = &note {
        text.push_str(&format!("\n{note}\n"));
    }
    let json = json!({
        "event": "recovery.finished",
        "job": job.id.to_string(),
        "state": format!("{:?}", job.state),
        "vm": job.vm.to_string(),
        "vm_name": vm_name,
        "rp": rp.map(|r| r.to_string()),
        "target": target_text,
        "bytes_written": bytes_written,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
        "written": recovery.and_then(|r| r.written.clone()),
        "note": note,
    });
    Notice {
        subject,
        text,
        json,
    }
}

/// A recovery target in words.
pub fn describe_target(target: &RecoveryTarget) -> String {
    match target {
        RecoveryTarget::OriginalVm => "the original VM (its disks overwritten)".into(),
        RecoveryTarget::AlternateHost { node, path, format } => format!(
            "a new VM on node {node}, disks in {path} ({})",
            format_name(*format)
        ),
        RecoveryTarget::CopyToFolder { node, path } => format!("folder {path} on node {node}"),
        RecoveryTarget::ItemLevel { node, path, .. } => {
            format!("items into {path} on node {node}")
        }
    }
}

/// What the user must know after a recovery: a VM recovered to another host is not protected
/// and not highly available until they add it.
pub fn recovery_note(target: &RecoveryTarget, state: JobState) -> Option<String> {
    match (target, state) {
        (RecoveryTarget::AlternateHost { node, .. }, JobState::Succeeded) => Some(format!(
            "The recovered VM is a new VM on node {node}: it is not highly available and not \
             protected by any protection group until you add it (cairn group create/add)."
        )),
        (RecoveryTarget::OriginalVm, JobState::Succeeded) => Some(
            "The VM is as it was at the recovery point and stays in its protection group; its \
             next backup reads every block."
                .into(),
        ),
        (RecoveryTarget::OriginalVm, JobState::Failed | JobState::Cancelled) => Some(
            "The VM's disks may be partly overwritten: run the recovery again (it continues \
             where it stopped) before starting the VM."
                .into(),
        ),
        _ => None,
    }
}

/// Sends notifications.
#[derive(Debug, Clone)]
pub struct Notifier {
    config: NotifyConfig,
    webhooks: std::sync::Arc<webhook::Client>,
}

impl Notifier {
    pub fn new(config: NotifyConfig) -> Notifier {
        let webhooks = webhook::Client::new(webhook::WebhookConfig {
            allow: config.webhook_allow.clone(),
            extra_roots: config.webhook_roots.clone(),
            timeout: config.timeout,
        });
        Notifier {
            config,
            webhooks: std::sync::Arc::new(webhooks),
        }
    }

    /// Delivers `notice` to `target` (`mailto:ADDRESS` or an `https://` URL), retrying
    /// transient failures. Returns whether it was delivered and the receiver's answer or the
    /// last error.
    pub async fn deliver(&self, target: &str, notice: &Notice) -> (bool, String) {
        let attempts = self.config.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.attempt(target, notice).await {
                Ok(answer) => return (true, answer),
                Err(err) => {
                    tracing::warn!(target, attempt, error = %err, "notification not delivered");
                    last = err.to_string();
                    if !err.retryable() || attempt == attempts {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500 << (2 * attempt))).await;
                }
            }
        }
        (false, last)
    }

    async fn attempt(&self, target: &str, notice: &Notice) -> Result<String, Error> {
        if target.starts_with("https://") || target.starts_with("http://") {
            // The webhook client has its own timeout (the same one) and names the URL in it.
            // An `http://` target (recorded before webhooks became https only) is refused by
            // the client with the reason.
            let body = serde_json::to_vec(&notice.json).unwrap_or_default();
            return Ok(self.webhooks.post(target, &body).await?);
        }
        let Some(address) = target.strip_prefix("mailto:") else {
            return Err(Error::UnknownTarget(target.to_string()));
        };
        let server = self
            .config
            .smtp_server
            .as_deref()
            .ok_or(Error::NoSmtpServer)?;
        let mail = smtp::Mail {
            from: self.config.from.clone(),
            to: address.to_string(),
            subject: notice.subject.clone(),
            body: notice.text.clone(),
            date_ms: now_ms(),
            message_id: format!(
                "{}.{}@{}",
                notice.json["job"].as_str().unwrap_or("job"),
                now_ms(),
                self.config.hostname
            ),
        };
        match tokio::time::timeout(
            self.config.timeout,
            smtp::send(server, &self.config.hostname, &mail),
        )
        .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Timeout),
        }
    }
}

fn now_ms() -> u64 {
    crate::clock::wall_ms()
}

#[cfg(test)]
mod tests;
