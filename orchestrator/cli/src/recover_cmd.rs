//! `cairn recover`: a recovery to the original VM, to another host or to a folder, with the
//! options of MABS's Recovery Wizard, through the HTTP API (`POST /v1/vms/{vm}/recover`).
//! With `--wait` it follows the job like `cairn backup --wait` and prints what the user must
//! know at the end (e.g. that a VM recovered to another host is not protected yet).

use anyhow::{Result, anyhow};
use cairn_orchestrator::api::recover::{
    FormatWire, RecoverRequest, RecoverTargetWire, ThrottleWire,
};
use cairn_orchestrator::policy::tz::{Error as TimeZoneError, TimeZone};
use cairn_orchestrator::views::{Accepted, JobView, RpView};
use clap::{ArgGroup, Args, ValueEnum};

use crate::client_cmd::{
    Client, ServerOpts, WaitOpts, from_value, pick_rp, print_json, resolve_vm, wait_for_job,
};
use crate::units::parse_size;

/// Image formats of a recovery to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
    Vhdx,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_original", "path", "folder"])))]
pub struct RecoverArgs {
    /// The VM (id or unique name).
    vm: String,
    /// Recovery point: its id, a unique prefix of at least 8 characters, or `latest`.
    #[arg(long)]
    rp: String,
    /// Overwrite the original VM's disks (it must be stopped); only what differs is written.
    #[arg(long)]
    to_original: bool,
    /// Recover as a new VM on another host: the images' folder there (with --node).
    #[arg(long, requires = "node")]
    path: Option<String>,
    /// Copy the disks and a manifest into this folder (on --node, default the VM's node).
    #[arg(long)]
    folder: Option<String>,
    /// Node that writes (--path: required; --folder: default the VM's node).
    #[arg(long)]
    node: Option<String>,
    /// Image format of a recovery to another host.
    #[arg(long, value_enum, default_value = "qcow2")]
    format: Format,
    /// Name of the new VM of a recovery to another host (default `<name>-recovered`).
    #[arg(long)]
    name: Option<String>,
    /// Limit the restore writes to this rate in work hours, per second (e.g. 50MiB).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    throttle: Option<u64>,
    /// Limit outside work hours (default: as --throttle; 0 = unlimited).
    #[arg(long, value_name = "RATE", value_parser = parse_size, requires = "throttle")]
    throttle_off_hours: Option<u64>,
    /// Work hours of the throttle, wall time of --timezone.
    #[arg(long, default_value = "08:00-18:00", requires = "throttle")]
    work_hours: String,
    /// Work days of the throttle, e.g. mon-fri or sat,sun.
    #[arg(long, default_value = "mon-fri", requires = "throttle")]
    work_days: String,
    /// Time zone of the work hours: an IANA name like Europe/Paris (daylight-saving changes
    /// included), UTC or +02:00 (default: the server's --timezone).
    #[arg(long, value_name = "ZONE", value_parser = parse_zone, requires = "throttle")]
    timezone: Option<String>,
    /// Time zone of the work hours as a fixed offset in minutes from UTC (e.g. 60, -300),
    /// instead of --timezone.
    #[arg(
        long,
        allow_hyphen_values = true,
        requires = "throttle",
        conflicts_with = "timezone"
    )]
    utc_offset: Option<i16>,
    /// E-mail this address when the recovery ends (the server's --smtp relay). Repeat.
    #[arg(long = "notify-email", value_name = "ADDRESS")]
    notify_email: Vec<String>,
    /// POST a JSON summary to this http:// URL when the recovery ends. Repeat.
    #[arg(long = "webhook", value_name = "URL")]
    webhooks: Vec<String>,
    #[command(flatten)]
    wait: WaitOpts,
    #[command(flatten)]
    opts: ServerOpts,
}

/// A `--timezone` the server will understand, in its canonical spelling.
fn parse_zone(text: &str) -> Result<String, TimeZoneError> {
    TimeZone::parse(text).map(|zone| zone.to_string())
}

/// The request `args` make (without the recovery point, which needs the server).
fn request(args: &RecoverArgs, rp: String) -> Result<RecoverRequest> {
    let (target, path, node, format, name) = if args.to_original {
        if args.node.is_some() || args.name.is_some() {
            return Err(anyhow!(
                "--node and --name do not apply to a recovery to the original VM"
            ));
        }
        (RecoverTargetWire::Original, None, None, None, None)
    } else if let Some(path) = &args.path {
        let format = match args.format {
            Format::Raw => FormatWire::Raw,
            Format::Qcow2 => FormatWire::Qcow2,
            Format::Vhdx => FormatWire::Vhdx,
        };
        (
            RecoverTargetWire::Host,
            Some(path.clone()),
            args.node.clone(),
            Some(format),
            args.name.clone(),
        )
    } else {
        if args.name.is_some() {
            return Err(anyhow!("--name applies only to a recovery to another host"));
        }
        (
            RecoverTargetWire::Folder,
            args.folder.clone(),
            args.node.clone(),
            None,
            None,
        )
    };
    Ok(RecoverRequest {
        rp,
        target,
        node,
        path,
        format,
        name,
        throttle: args.throttle.map(|rate| ThrottleWire {
            work_bytes_per_sec: rate,
            off_bytes_per_sec: args.throttle_off_hours,
            work_hours: Some(args.work_hours.clone()),
            work_days: Some(args.work_days.clone()),
            utc_offset_minutes: args.utc_offset,
            timezone: args.timezone.clone(),
        }),
        notify_email: args.notify_email.clone(),
        webhooks: args.webhooks.clone(),
    })
}

pub fn recover(args: &RecoverArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let vm = resolve_vm(&client, &args.vm)?;
    let rps: Vec<RpView> = from_value(client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?)?;
    let rp = pick_rp(&rps, &args.rp).map_err(|message| anyhow!(message))?;
    let body = request(args, rp.clone())?;
    let value = client.post(&format!("/v1/vms/{vm}/recover"), Some(&body))?;
    let accepted: Accepted = from_value(value.clone())?;
    if !args.opts.json {
        println!(
            "recovery job {} accepted: recovery point {rp} of vm {}",
            accepted.id, args.vm
        );
    }
    if !args.wait.wait {
        if args.opts.json {
            print_json(&value);
        }
        return Ok(0);
    }
    let code = wait_for_job(&client, &accepted, &args.wait, args.opts.json)?;
    if !args.opts.json {
        let job: JobView = from_value(client.get(&format!("/v1/jobs/{}", accepted.id), &[])?)?;
        if let Some(recovery) = job.recovery {
            println!(
                "target: {}; {} bytes written",
                recovery.target_text, recovery.bytes_written
            );
            if let Some(written) = recovery.written {
                println!("wrote {written}");
            }
            if let (Some(id), Some(name)) = (recovery.new_vm, recovery.new_vm_name) {
                println!("new VM {name} ({id})");
            }
            if let Some(note) = recovery.note {
                println!("note: {note}");
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: RecoverArgs,
    }

    fn parse(argv: &[&str]) -> Result<RecoverArgs, clap::Error> {
        let mut full = vec!["cairn"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map(|c| c.args)
    }

    #[test]
    fn targets_and_options_parse() {
        let args = parse(&[
            "web01",
            "--rp",
            "latest",
            "--path",
            "/dr",
            "--node",
            "kvm-02",
            "--format",
            "vhdx",
            "--throttle",
            "50MiB",
            "--throttle-off-hours",
            "0",
            "--utc-offset",
            "-300",
            "--notify-email",
            "ops@example.com",
            "--webhook",
            "https://h/x",
        ])
        .unwrap();
        let request = request(&args, "RP".into()).unwrap();
        assert_eq!(request.target, RecoverTargetWire::Host);
        assert_eq!(request.format, Some(FormatWire::Vhdx));
        let throttle = request.throttle.unwrap().to_throttle().unwrap();
        assert_eq!(throttle.work_bytes_per_sec, 50 << 20);
        assert_eq!(throttle.off_bytes_per_sec, 0);
        assert_eq!(throttle.utc_offset_minutes, -300);
        assert_eq!(request.notify_email, vec!["ops@example.com"]);
        let original = parse(&["web01", "--rp", "x", "--to-original"]).unwrap();
        assert_eq!(
            super::request(&original, "x".into()).unwrap().target,
            RecoverTargetWire::Original
        );
        // Exactly one target; --path needs --node.
        assert!(parse(&["web01", "--rp", "x"]).is_err());
        assert!(parse(&["web01", "--rp", "x", "--to-original", "--folder", "/f"]).is_err());
        assert!(parse(&["web01", "--rp", "x", "--path", "/p"]).is_err());
        assert!(parse(&["web01", "--rp", "x", "--folder", "/f", "--throttle", "fast"]).is_err());
    }

    #[test]
    fn throttle_work_hours_in_a_named_zone() {
        let base = [
            "web01",
            "--rp",
            "x",
            "--to-original",
            "--throttle",
            "1.5MiB",
        ];
        let args = parse(&[&base[..], &["--timezone", "europe/paris"]].concat()).unwrap();
        let throttle = request(&args, "x".into()).unwrap().throttle.unwrap();
        assert_eq!(throttle.timezone.as_deref(), Some("Europe/Paris"));
        assert_eq!(throttle.utc_offset_minutes, None);
        assert_eq!(throttle.work_bytes_per_sec, 1_572_864);
        // Neither flag: the server's zone.
        let args = parse(&base).unwrap();
        let throttle = request(&args, "x".into()).unwrap().throttle.unwrap();
        assert_eq!(
            (throttle.timezone, throttle.utc_offset_minutes),
            (None, None)
        );
        // A bad name is refused before anything is sent, naming it.
        let err = parse(&[&base[..], &["--timezone", "Europe/Pariss"]].concat()).unwrap_err();
        assert!(err.to_string().contains("\"Europe/Pariss\""), "{err}");
        // Not both.
        assert!(
            parse(&[&base[..], &["--timezone", "UTC", "--utc-offset", "60"]].concat()).is_err()
        );
    }
}
