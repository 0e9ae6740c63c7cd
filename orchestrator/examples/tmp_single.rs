use std::time::Instant;
use cairn_orchestrator::log::*;
use cairn_schemas::*;
#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(SledLogConfig::new(dir.path())).unwrap();
    let job = JobId::new_v7(1, [1; 10]);
    let n = 1000u64;
    let s = Instant::now();
    for v in 0..n {
        let mut r = [0u8; 10]; r[2..].copy_from_slice(&v.to_be_bytes());
        log.append(AppendRequest { aggregate: Aggregate::Job(job), expected_version: v, command: None, recorded_at: 1,
            events: vec![NewEvent::new(EventId::new_v7(1, r), "x", JobEvent::JobSucceeded)] }).await.unwrap();
    }
    let e = s.elapsed();
    println!("total {:?}/op", e / n as u32);
}
