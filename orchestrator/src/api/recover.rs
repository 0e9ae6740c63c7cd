//! `POST /v1/vms/{vm}/recover`: a recovery to the original VM, to another host or to a folder,
//! with the options of MABS's Recovery Wizard (throttle with a work schedule, e-mail and
//! webhook notification). Wire types and the handler; the decision is `decide`'s.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cairn_schemas::{
    Command, ImageFormat, NodeId, RecoveryOptions, RecoveryPointId, RecoveryTarget, Throttle, VmId,
};
use serde::{Deserialize, Serialize};

use super::extract::{Actor, Caller, IdPath, JsonBody};
use super::wire::check_target_path;
use super::{AppState, Error};
use crate::policy::tz::TimeZone;
use crate::views::Accepted;

/// Where a recovery writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoverTargetWire {
    /// Over the original VM's disks (it must be stopped).
    Original,
    /// A new VM on `node`, images in `path`, in `format`.
    Host,
    /// The disks as files in `path` on `node`, with a manifest.
    Folder,
}

/// Image formats a recovery can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatWire {
    Raw,
    Qcow2,
    Vhdx,
}

impl From<FormatWire> for ImageFormat {
    fn from(format: FormatWire) -> Self {
        match format {
            FormatWire::Raw => ImageFormat::Raw,
            FormatWire::Qcow2 => ImageFormat::Qcow2,
            FormatWire::Vhdx => ImageFormat::Vhdx,
        }
    }
}

/// Bandwidth throttle with a work schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleWire {
    /// Limit in work hours, bytes per second (0 = unlimited).
    pub work_bytes_per_sec: u64,
    /// Limit outside work hours, bytes per second (0 = unlimited; default: as in work hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_bytes_per_sec: Option<u64>,
    /// `HH:MM-HH:MM` (default `08:00-18:00`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_hours: Option<String>,
    /// `mon-fri` (default), `mon-sun`, or a list like `mon,wed,fri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_days: Option<String>,
    /// The schedule's fixed offset from UTC in minutes (older clients; not with `timezone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_minutes: Option<i16>,
    /// The schedule's time zone: an IANA name like `Europe/Paris` (work hours follow its
    /// daylight-saving changes), `UTC` or a fixed offset like `+02:00`. Default: the
    /// orchestrator's zone (`--timezone`), unless `utc_offset_minutes` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `08:00-18:00` → minutes after midnight.
pub fn parse_work_hours(text: &str) -> Result<(u16, u16), String> {
    let minute = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("work hours {text:?} are not HH:MM-HH:MM"))?;
    match (minute(a), minute(b)) {
        (Some(a), Some(b)) if a < b => Ok((a, b)),
        _ => Err(format!(
            "work hours {text:?} are not HH:MM-HH:MM with the start before the end"
        )),
    }
}

/// `mon-fri`, `sat,sun`, `mon-sun` → bit set (bit 0 = Monday).
pub fn parse_work_days(text: &str) -> Result<u8, String> {
    let day = |d: &str| {
        DAYS.iter()
            .position(|x| x.eq_ignore_ascii_case(d.trim()))
            .ok_or_else(|| {
                format!(
                    "{d:?} in work days {text:?} is not one of {}",
                    DAYS.join(", ")
                )
            })
    };
    let mut bits = 0u8;
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a > b {
                    return Err(format!("work days range {part:?} runs backwards"));
                }
                for d in a..=b {
                    bits |= 1 << d;
                }
            }
            None => bits |= 1 << day(part)?,
        }
    }
    Ok(bits)
}

impl ThrottleWire {
    pub fn to_throttle(&self) -> Result<Throttle, String> {
        let (start, end) = parse_work_hours(self.work_hours.as_deref().unwrap_or("08:00-18:00"))?;
        let throttle = Throttle {
            work_bytes_per_sec: self.work_bytes_per_sec,
            off_bytes_per_sec: self.off_bytes_per_sec.unwrap_or(self.work_bytes_per_sec),
            work_days: parse_work_days(self.work_days.as_deref().unwrap_or("mon-fri"))?,
            work_start_minute: start,
            work_end_minute: end,
            utc_offset_minutes: self.utc_offset_minutes.unwrap_or(0),
        };
        throttle.validate()?;
        Ok(throttle)
    }

    /// The throttle and the zone of its work hours, as `RequestRecoveryInZone` carries it
    /// (`None`: the fixed `utc_offset_minutes` says it all). `default_zone` is the
    /// orchestrator's; `now` (Unix ms) gives the offset written into the throttle for workers
    /// that cannot read the zone.
    pub fn to_throttle_in_zone(
        &self,
        default_zone: &TimeZone,
        now: u64,
    ) -> Result<(Throttle, Option<String>), Error> {
        let bad = |message: String| Error::invalid_request(format!("throttle: {message}"));
        let zone = match (&self.timezone, self.utc_offset_minutes) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "give timezone or utc_offset_minutes, not both".to_owned()
                ));
            }
            (Some(name), None) => Some(TimeZone::parse(name).map_err(|e| bad(e.to_string()))?),
            (None, Some(_)) => None,
            (None, None) => Some(default_zone.clone()),
        };
        let mut throttle = self.to_throttle().map_err(bad)?;
        let Some(zone) = zone else {
            return Ok((throttle, None));
        };
        let offset = zone.offset_at(i64::try_from(now).unwrap_or(i64::MAX));
        throttle.utc_offset_minutes = i16::try_from(offset).unwrap_or(0);
        throttle.validate().map_err(bad)?;
        Ok((throttle, zone.wire_name()))
    }
}

/// `POST /v1/vms/{vm}/recover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// The recovery point id.
    pub rp: String,
    pub target: RecoverTargetWire,
    /// `host`, `folder`: the node that writes (default for `folder`: the VM's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `host`, `folder`: absolute folder for the images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `host`: image format (default qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FormatWire>,
    /// `host`: the new VM's name (default `<name>-recovered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleWire>,
    /// E-mail addresses told when the recovery ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify_email: Vec<String>,
    /// `http://` URLs that receive a JSON POST when the recovery ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<String>,
}

pub(super) async fn request_recover(
    State(state): State<AppState>,
    actor: Actor,
    Caller(caller): Caller,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<RecoverRequest>,
) -> Result<(StatusCode, Json<Accepted>), Error> {
    let rp: RecoveryPointId = request
        .rp
        .parse()
        .map_err(|err| Error::invalid_id(format!("rp: {err}")))?;
    let node = |required: bool| -> Result<Option<NodeId>, Error> {
        match &request.node {
            Some(text) => NodeId::new(text.as_str())
                .map(Some)
                .map_err(|err| Error::invalid_id(format!("node: {err}"))),
            None if required => Err(Error::invalid_request("node is required for this target")),
            None => Ok(None),
        }
    };
    let path = || -> Result<String, Error> {
        let path = request
            .path
            .clone()
            .ok_or_else(|| Error::invalid_request("path is required for this target"))?;
        check_target_path("path", &path)?;
        Ok(path)
    };
    let target = match request.target {
        RecoverTargetWire::Original => {
            if request.node.is_some() || request.path.is_some() || request.format.is_some() {
                return Err(Error::invalid_request(
                    "node, path and format do not apply to a recovery to the original VM",
                ));
            }
            RecoveryTarget::OriginalVm
        }
        RecoverTargetWire::Host => RecoveryTarget::AlternateHost {
            node: node(true)?.expect("required"),
            path: path()?,
            format: request.format.unwrap_or(FormatWire::Qcow2).into(),
        },
        RecoverTargetWire::Folder => {
            if request.format.is_some() {
                return Err(Error::invalid_request(
                    "a copy to a folder keeps each disk's format; format does not apply",
                ));
            }
            let node = match node(false)? {
                Some(node) => node,
                None => super::handlers::vm_node(&state, vm)?,
            };
            RecoveryTarget::CopyToFolder {
                node,
                path: path()?,
            }
        }
    };
    super::scope::check_recovery_target(&caller, state.control.as_ref(), &target)?;
    let job = state.control.new_job_id();
    let (throttle, timezone) = match &request.throttle {
        Some(wire) => {
            let (throttle, zone) =
                wire.to_throttle_in_zone(&state.control.timezone(), job.unix_millis())?;
            (Some(throttle), zone)
        }
        None => (None, None),
    };
    let options = RecoveryOptions {
        throttle,
        notify_email: request.notify_email,
        webhooks: request.webhooks,
        new_name: request.name,
    };
    let command = match timezone {
        Some(timezone) => Command::RequestRecoveryInZone {
            job,
            vm,
            rp,
            target,
            options,
            timezone,
        },
        None => Command::RequestRecovery {
            job,
            vm,
            rp,
            target,
            options,
        },
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_schedules_parse() {
        assert_eq!(parse_work_hours("08:00-18:00").unwrap(), (480, 1080));
        assert_eq!(parse_work_hours("00:00-24:00").unwrap(), (0, 1440));
        for bad in [
            "8-18",
            "18:00-08:00",
            "08:00-08:00",
            "25:00-26:00",
            "08:61-09:00",
        ] {
            assert!(parse_work_hours(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_work_days("mon-fri").unwrap(), 0b001_1111);
        assert_eq!(parse_work_days("sat,sun").unwrap(), 0b110_0000);
        assert_eq!(parse_work_days("Mon,wed-thu").unwrap(), 0b000_1101);
        for bad in ["", "fri-mon", "funday"] {
            assert!(parse_work_days(bad).is_err(), "{bad}");
        }
    }
}
