//! Recovery requests: validation of a `RequestRecovery` or `RequestRecoveryInZone` command
//! (target, options, the throttle's zone) into the `JobRequested` + `RecoveryOptionsSet` (+
//! `RecoveryTimeZoneSet`) events of a new recovery job. Pure, like `decide`.
//!
//! What each target means (MABS's Recovery Wizard, see README):
//! - `OriginalVm`: the VM's own disks are overwritten by a delta restore on the VM's node. The
//!   worker's `PrepareRecovery` step refuses a running VM before anything is written. The VM
//!   keeps its id, so it stays in its protection group; the next backup reads every block.
//! - `AlternateHost`: new images on the target node in the format asked for, and a descriptor
//!   that gives the VM a *new* identity (id derived from the job id; name `<name>-recovered`
//!   unless given), so the original and the copy never look like one VM that moved. The copy
//!   is in no protection group until the user adds it.
//! - `CopyToFolder`: the disks as image files plus a `cairn-recovery-<rp>.json` manifest.
//!
//! Must not: do IO or read the clock.

use crate::error_code::ErrorCode;
use cairn_schemas::{
    Aggregate, ImageFormat, JobEvent, JobId, JobKind, JobReason, RecoveryOptions, RecoveryPointId,
    RecoveryTarget, VmId,
};

use super::decide::{Emit, check_path, conflict, invalid, not_found, present_vm};
use super::state::State;
use crate::control::ControlError;

/// Most e-mail addresses of one recovery.
pub const MAX_EMAILS: usize = 16;
/// Most webhooks of one recovery.
pub const MAX_WEBHOOKS: usize = 8;
/// Longest accepted webhook URL.
pub const MAX_URL_LEN: usize = 2048;

pub fn decide_recovery(
    state: &State,
    job: JobId,
    vm: VmId,
    rp: RecoveryPointId,
    target: &RecoveryTarget,
    options: &RecoveryOptions,
    timezone: Option<&str>,
) -> Result<Vec<Emit>, ControlError> {
    let known = present_vm(state, vm)?;
    let Some(point) = state
        .rps
        .get(&vm)
        .and_then(|list| list.iter().find(|r| r.rp == rp))
    else {
        return Err(not_found(
            ErrorCode::UnknownRp,
            format!("VM {} has no recovery point {rp}", known.name),
        ));
    };
    super::softdelete::check_usable(point, &known.name)?;
    if state.jobs.contains_key(&job) {
        return Err(conflict(
            ErrorCode::Conflict,
            format!("job id {job} is taken"),
        ));
    }
    let node_known = |node| {
        if state.nodes.contains_key(node) {
            Ok(())
        } else {
            Err(not_found(ErrorCode::UnknownNode, format!("no node {node}")))
        }
    };
    match target {
        RecoveryTarget::OriginalVm => {
            if let Some(active) = state
                .jobs
                .values()
                .find(|j| j.vm == vm && !j.state.is_terminal() && super::jobs::writes_original(j))
            {
                return Err(conflict(
                    ErrorCode::JobRunning,
                    format!(
                        "a recovery over VM {}'s disks is already queued or running (job {})",
                        known.name, active.id
                    ),
                ));
            }
            if options.new_name.is_some() {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    "a new name applies only to a recovery to another host".into(),
                ));
            }
        }
        RecoveryTarget::AlternateHost { node, path, format } => {
            node_known(node)?;
            check_path(path)?;
            if *format == ImageFormat::Vhd {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    "format vhd cannot be written; choose raw, qcow2 or vhdx".into(),
                ));
            }
        }
        RecoveryTarget::CopyToFolder { node, path } => {
            node_known(node)?;
            check_path(path)?;
        }
        RecoveryTarget::ItemLevel { .. } => {
            return Err(invalid(
                ErrorCode::Unsupported,
                "item-level recovery is requested with its own command".into(),
            ));
        }
    }
    check_options(options)?;
    if let Some(name) = timezone {
        crate::policy::tz::TimeZone::jiff_from_wire(name)
            .map_err(|e| invalid(ErrorCode::InvalidRequest, format!("throttle: {e}")))?;
    }
    let zone_event = timezone.map(|name| {
        JobEvent::RecoveryTimeZoneSet {
            timezone: name.to_owned(),
        }
        .into()
    });
    Ok(vec![Emit::new(
        Aggregate::Job(job),
        [
            JobEvent::JobRequested {
                kind: JobKind::Recovery {
                    rp,
                    target: target.clone(),
                },
                vm,
                group: known.group,
                reason: JobReason::Manual,
                not_before: None,
            }
            .into(),
            JobEvent::RecoveryOptionsSet {
                options: options.clone(),
            }
            .into(),
        ]
        .into_iter()
        .chain(zone_event)
        .collect(),
    )])
}

/// Checks a recovery's options; the error names the bad value.
pub fn check_options(options: &RecoveryOptions) -> Result<(), ControlError> {
    if let Some(throttle) = &options.throttle {
        throttle
            .validate()
            .map_err(|e| invalid(ErrorCode::InvalidRequest, format!("throttle: {e}")))?;
    }
    if options.notify_email.len() > MAX_EMAILS {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("at most {MAX_EMAILS} e-mail addresses"),
        ));
    }
    for address in &options.notify_email {
        check_email(address).map_err(|e| invalid(ErrorCode::InvalidRequest, e))?;
    }
    if options.webhooks.len() > MAX_WEBHOOKS {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("at most {MAX_WEBHOOKS} webhooks"),
        ));
    }
    for url in &options.webhooks {
        check_webhook(url).map_err(|e| invalid(ErrorCode::InvalidRequest, e))?;
    }
    if let Some(name) = &options.new_name
        && (name.trim().is_empty()
            || name.chars().count() > 100
            || name.chars().any(|c| c.is_control() || c == '/'))
    {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("new VM name {name:?} must be 1 to 100 printable characters without '/'"),
        ));
    }
    Ok(())
}

/// A plain `local@domain` address: what SMTP's `RCPT TO:<…>` accepts without quoting.
pub fn check_email(address: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("e-mail address {address:?} {why}"));
    if address.len() > 254 {
        return bad("is longer than 254 bytes");
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return bad("has no '@'");
    };
    let atom = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c);
    if local.is_empty() || local.len() > 64 || !local.chars().all(atom) {
        return bad("has an empty or unusual local part");
    }
    if domain.is_empty()
        || !domain
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return bad("has an invalid domain");
    }
    Ok(())
}

/// A webhook URL: `https://host[:port][/path][?query]`, printable ASCII, no credentials and
/// no fragment. Webhooks go out only over TLS: `http://` is refused, since the notice would
/// cross the network in clear and could be altered on the way. Whether the host may be
/// reached at all is decided when the notification is sent (`notify::address`), where the
/// operator's allow-list is known and the name is resolved.
pub fn check_webhook(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("webhook URL is longer than {MAX_URL_LEN} bytes"));
    }
    if !url.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "webhook URL {url:?} must be printable ASCII without spaces"
        ));
    }
    if url.starts_with("http://") {
        return Err(format!(
            "webhook URL {url:?} must use https://: webhooks are sent only over TLS"
        ));
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!("webhook URL {url:?} must start with https://"));
    };
    if url.contains('#') {
        return Err(format!("webhook URL {url:?} must not have a #fragment"));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "webhook URL {url:?} must not carry credentials (user@host)"
        ));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, after)) if after.is_empty() || after.starts_with(':') => {
                (host, after.strip_prefix(':'))
            }
            _ => {
                return Err(format!(
                    "webhook URL {url:?} has an IPv6 address without its closing ']'"
                ));
            }
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(format!("webhook URL {url:?} has no host"));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        return Err(format!(
            "webhook URL {url:?} has port {port:?}; a port is a number from 1 to 65535"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_webhooks_are_checked() {
        assert!(check_email("ops@example.com").is_ok());
        assert!(check_email("a.b+c@mail.example-1.org").is_ok());
        for bad in [
            "",
            "ops",
            "@x.org",
            "ops@",
            "o ps@x.org",
            "ops@x..org",
            "a\r\n@x.org",
        ] {
            assert!(check_email(bad).is_err(), "{bad:?}");
        }
        for good in [
            "https://127.0.0.1:8443/hook",
            "https://hooks.example.com",
            "https://hooks.example.com/cairn?token=abc",
            "https://[2001:db8::1]:9443/h",
            "https://[::1]",
        ] {
            assert_eq!(check_webhook(good), Ok(()), "{good:?}");
        }
        for (bad, problem) in [
            ("http://hooks.example.com/cairn", "must use https://"),
            ("http://127.0.0.1:8080/hook", "must use https://"),
            ("ftp://x", "must start with https://"),
            ("x", "must start with https://"),
            ("https://", "has no host"),
            ("https:///path", "has no host"),
            ("https://:443/", "has no host"),
            ("https://u:p@x/", "credentials"),
            ("https://x/a b", "printable ASCII"),
            ("https://x/#frag", "fragment"),
            ("https://x:0/", "port \"0\""),
            ("https://x:99999/", "from 1 to 65535"),
            ("https://x:/", "port \"\""),
            ("https://[::1/", "closing ']'"),
        ] {
            let e = check_webhook(bad).expect_err(bad);
            assert!(e.contains(problem), "{bad:?}: {e}");
        }
    }
}
