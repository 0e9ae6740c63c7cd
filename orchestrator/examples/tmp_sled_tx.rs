use sled::Transactional;
use std::time::Instant;
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(256 << 20)
        .open()
        .unwrap();
    let t: Vec<_> = (0..5)
        .map(|i| db.open_tree(format!("t{i}")).unwrap())
        .collect();
    let v = vec![1u8; 187];
    let n = 1000u64;
    let s = Instant::now();
    for i in 0..n {
        t[0].insert(i.to_be_bytes(), v.as_slice()).unwrap();
    }
    println!("raw insert no flush: {:?}/op", s.elapsed() / n as u32);
    let s = Instant::now();
    for i in 0..n {
        (&t[0], &t[1], &t[2], &t[3], &t[4])
            .transaction(|(a, b, c, d, e)| {
                a.insert(&(i + n).to_be_bytes(), v.as_slice())?;
                b.insert(&i.to_be_bytes(), &i.to_be_bytes())?;
                c.insert(b"h", &i.to_be_bytes())?;
                let _ = d.get(b"x")?;
                e.insert(b"last", &i.to_be_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
    }
    println!("tx no flush: {:?}/op", s.elapsed() / n as u32);
    let s = Instant::now();
    for _ in 0..n {
        db.flush().unwrap();
    }
    println!("flush of nothing: {:?}/op", s.elapsed() / n as u32);
    let s = Instant::now();
    for i in 0..n {
        (&t[0], &t[1], &t[2], &t[3], &t[4])
            .transaction(|(a, b, c, d, e)| {
                a.insert(&(i + 2 * n).to_be_bytes(), v.as_slice())?;
                b.insert(&i.to_be_bytes(), &i.to_be_bytes())?;
                c.insert(b"h", &i.to_be_bytes())?;
                let _ = d.get(b"x")?;
                e.insert(b"last", &i.to_be_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
        db.flush().unwrap();
    }
    println!("tx + flush: {:?}/op", s.elapsed() / n as u32);
    let s = Instant::now();
    for i in 0..n {
        t[0].insert((i + 3 * n).to_be_bytes(), v.as_slice())
            .unwrap();
        t[1].insert(i.to_be_bytes(), &i.to_be_bytes()).unwrap();
        t[2].insert(b"h", &i.to_be_bytes()).unwrap();
        t[4].insert(b"last", &i.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    println!("4 plain inserts + flush: {:?}/op", s.elapsed() / n as u32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = Instant::now();
    rt.block_on(async {
        for _ in 0..n {
            tokio::task::spawn_blocking(|| ()).await.unwrap();
        }
    });
    println!("spawn_blocking: {:?}/op", s.elapsed() / n as u32);
    let s = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            t[0].insert((i + 4 * n).to_be_bytes(), v.as_slice())
                .unwrap();
            db.flush_async().await.unwrap();
        }
    });
    println!("insert + flush_async: {:?}/op", s.elapsed() / n as u32);
}
