use std::time::Instant;
use cairn_orchestrator::log::*;
use cairn_schemas::*;
#[tokio::main]
async fn main() {
    let path = std::env::args().nth(1).unwrap();
    if !std::path::Path::new(&path).exists() {
        let log = SledLog::open(SledLogConfig::new(&path)).unwrap();
        let s = Instant::now();
        for a in 0..(1_000_000 / 250) as u64 {
            let job = JobId::new_v7(1, [(a % 200) as u8; 10]);
            let v = log.read_aggregate(&Aggregate::Job(job)).await.unwrap().len() as u64;
            let events = (0..250u64).map(|i| { let n = a * 250 + i; let mut r = [0u8; 10]; r[2..].copy_from_slice(&n.to_be_bytes());
                NewEvent { event_id: EventId::new_v7(1_767_225_600_000 + n, r), actor: "node:kvm-01".into(), correlation: Some(job), causation: None,
                  traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                  payload: JobEvent::StepProgressed { step: StepId::new_v7(1, [7; 10]), attempt: 1, bytes_done: n << 20, bytes_total: 100 << 30 }.into() } }).collect();
            log.append(AppendRequest { aggregate: Aggregate::Job(job), expected_version: v, command: None, recorded_at: 1, events }).await.unwrap();
        }
        println!("generated in {:?}", s.elapsed());
    }
    {
        let cache: u64 = std::env::var("CACHE_MB").map(|v| v.parse().unwrap()).unwrap_or(256); let db = sled::Config::new().path(&path).cache_capacity(cache << 20).open().unwrap();
        let t = db.open_tree("events").unwrap();
        for pass in 0..2 {
            let s = Instant::now();
            let mut n = 0u64; let mut b = 0usize;
            for item in t.iter() { let (_k, v) = item.unwrap(); n += 1; b += v.len(); }
            println!("raw iter pass {pass}: {:.0}/s ({n} items, {b} bytes)", n as f64 / s.elapsed().as_secs_f64());
        }
        let s = Instant::now();
        let all: Vec<_> = t.iter().map(|i| i.unwrap().1).collect();
        println!("collect: {:.0}/s", all.len() as f64 / s.elapsed().as_secs_f64());
        let s = Instant::now();
        let mut x = 0u64;
        for v in &all { let e = decode(v).unwrap(); x += e.aggregate_version; }
        println!("decode only: {:.0}/s {x}", all.len() as f64 / s.elapsed().as_secs_f64());
        let s = Instant::now();
        for v in &all { let h = blake3::hash(v); x += h.as_bytes()[0] as u64; }
        println!("blake3 only: {:.0}/s {x}", all.len() as f64 / s.elapsed().as_secs_f64());
    }
    let log = SledLog::open(SledLogConfig::new(&path)).unwrap();
    for pass in 0..2 {
        let s = Instant::now();
        let mut next = 1; let mut n = 0;
        loop { let p = log.read_from(next, 10_000).await.unwrap(); let Some(l) = p.last() else { break }; next = l.seq + 1; n += p.len(); }
        println!("read_from pass {pass}: {:.0}/s", n as f64 / s.elapsed().as_secs_f64());
    }
}
