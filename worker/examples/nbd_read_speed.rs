//! Measures sequential read throughput of an image through qemu-nbd and our NBD client.
//!
//! ```text
//! cargo run --release -p cairn-worker --example nbd_read_speed -- IMAGE [CALL_MIB] [REQUEST_KIB] [DEPTH]
//! ```
//!
//! Reads the whole image in calls of CALL_MIB (default 4) MiB, each split into requests of
//! REQUEST_KIB (default: the client's default) with DEPTH (default: the client's default) in
//! flight, first through the `Source` API (`open_source`, default settings), then through a
//! directly configured client. Prints MiB/s for both.

use std::path::PathBuf;
use std::time::Instant;

use cairn_worker::nbd::ConnectOptions;
use cairn_worker::source::open_source;
use cairn_worker::source::qemu_nbd::{EXPORT_NAME, QemuNbd, QemuNbdOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(image) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: nbd_read_speed IMAGE [CALL_MIB] [REQUEST_KIB] [DEPTH]");
        std::process::exit(2);
    };
    let call = args.get(2).map_or(Ok(4), |s| s.parse::<usize>())? << 20;
    let defaults = ConnectOptions::new(EXPORT_NAME);
    let request_kib = args
        .get(3)
        .map_or(Ok(defaults.request_size >> 10), |s| s.parse::<u32>())?;
    let depth = args
        .get(4)
        .map_or(Ok(defaults.pipeline_depth), |s| s.parse::<usize>())?;
    let mut buf = vec![0u8; call];

    let mut source = open_source(&image, None)?;
    let size = source.size();
    let started = Instant::now();
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(call as u64) as usize;
        source.read_at(pos, &mut buf[..n])?;
        pos += n as u64;
    }
    report(
        &source.describe(),
        "Source API, default client settings",
        size,
        started,
    );
    drop(source);

    let format = match image.extension().and_then(|e| e.to_str()) {
        Some(ext) => ext.parse()?,
        None => cairn_worker::source::ImageFormat::Raw,
    };
    let mut server = QemuNbd::start(&image, &QemuNbdOptions::new(format, false))?;
    let mut opts = ConnectOptions::new(EXPORT_NAME);
    opts.request_size = request_kib << 10;
    opts.pipeline_depth = depth;
    let mut client = server.connect(&opts)?;
    let started = Instant::now();
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(call as u64) as usize;
        client.read_at(pos, &mut buf[..n])?;
        pos += n as u64;
    }
    let how = format!("client, {request_kib} KiB requests, depth {depth}");
    report(&image.display().to_string(), &how, size, started);
    client.disconnect()?;
    server.stop()?;
    Ok(())
}

fn report(what: &str, how: &str, size: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let mib = size as f64 / f64::from(1 << 20);
    println!(
        "{what}: {mib:.0} MiB in {secs:.3} s = {:.0} MiB/s ({how})",
        mib / secs
    );
}
