use std::time::Instant;
use cairn_orchestrator::log::*;
#[tokio::main]
async fn main() {
    let path = std::env::args().nth(1).unwrap();
    let log = SledLog::open(SledLogConfig::new(&path)).unwrap();
    let passes: usize = std::env::var("PASSES").map(|v| v.parse().unwrap()).unwrap_or(4); for pass in 0..passes {
        let s = Instant::now();
        let mut next = 1; let mut n = 0;
        loop { let p = log.read_from(next, 10_000).await.unwrap(); let Some(l) = p.last() else { break }; next = l.seq + 1; n += p.len(); }
        println!("read_from pass {pass}: {:.0}/s", n as f64 / s.elapsed().as_secs_f64());
    }
}
