use corral_core::probe::{run_check, Check};
use std::time::{Duration, Instant};
fn cpu() -> f64 {
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    (r.ru_utime.tv_sec as f64 + r.ru_utime.tv_usec as f64 / 1e6)
        + (r.ru_stime.tv_sec as f64 + r.ru_stime.tv_usec as f64 / 1e6)
}
fn main() {
    let port: u16 = std::env::args().nth(1).unwrap().parse().unwrap();
    let batch: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = 4000 / batch;
    let (c0, t0) = (cpu(), Instant::now());
    rt.block_on(async {
        for _ in 0..n {
            let hs: Vec<_> = (0..batch)
                .map(|_| {
                    tokio::spawn(async move {
                        run_check(
                            &Check::Tcp {
                                host: "127.0.0.1".into(),
                                port,
                            },
                            Duration::from_secs(1),
                        )
                        .await
                    })
                })
                .collect();
            for h in hs {
                h.await.unwrap().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let total = (n * batch) as f64;
    println!(
        "batch {batch}: {:.1} us cpu per probe, {:.1} us wall",
        (cpu() - c0) / total * 1e6,
        t0.elapsed().as_secs_f64() / total * 1e6
    );
}
