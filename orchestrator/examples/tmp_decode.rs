use std::time::Instant;
use cairn_schemas::*;
fn main() {
    let job = JobId::new_v7(1, [1; 10]);
    let env = Envelope { event_id: EventId::new_v7(1, [2; 10]), aggregate: Aggregate::Job(job), aggregate_version: 5, recorded_at: 1_767_225_600_000,
        actor: "node:kvm-01".into(), correlation: Some(job), causation: None, command: None,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()), prev_hash: [3; 32],
        payload: JobEvent::StepProgressed { step: StepId::new_v7(1, [7; 10]), attempt: 1, bytes_done: 5 << 20, bytes_total: 100 << 30 }.into() };
    let bytes = encode(&env);
    let n = 2_000_000;
    let s = Instant::now();
    let mut x = 0u64;
    for _ in 0..n { let e = decode(&bytes).unwrap(); x += e.aggregate_version; }
    println!("decode hot: {:.0}/s ({} bytes) {x}", n as f64 / s.elapsed().as_secs_f64(), bytes.len());
    let s = Instant::now();
    let mut v = Vec::with_capacity(10_000);
    for i in 0..n { v.push(decode(&bytes).unwrap()); if i % 10_000 == 9_999 { v.clear(); } }
    println!("decode into vec: {:.0}/s", n as f64 / s.elapsed().as_secs_f64());
}
