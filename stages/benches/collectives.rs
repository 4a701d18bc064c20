//! What the collectives of data-parallel training cost through the c10d
//! shim: 2 ranks (two threads of this process, Gloo over TCP on loopback)
//! on f32 gradients of each given size. One JSON line per size on stdout:
//! the median of 20 all-reduces (DDP) and of 20 reduce-scatters followed by
//! all-gathers (ZeRO-1), in milliseconds. `bench/ddp.py` runs it for the
//! models it trains.
//!
//! usage: cargo bench --workspace --bench collectives -- ELEMENTS...

use std::time::{Duration, Instant};

use llmflow_stages::dist::{launch, Group};
use tch::{Device, Kind, Tensor};

const ROUNDS: usize = 20;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[ROUNDS / 2]
}

fn main() {
    let sizes: Vec<i64> =
        std::env::args().skip(1).filter(|a| !a.starts_with("--")).map(|a| a.parse().expect("a number of elements")).collect();
    let port = launch::free_port("127.0.0.1").expect("a free port");
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let sizes = sizes.clone();
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let group = Group::join("127.0.0.1", port, rank, 2, Duration::from_secs(60)).expect("joining the group");
                for n in sizes {
                    let n = n + n % 2; // two equal shares
                    let grads = Tensor::ones([n], (Kind::Float, Device::Cpu));
                    let share = Tensor::zeros([n / 2], (Kind::Float, Device::Cpu));
                    let all_reduce = median_ms(|| group.all_reduce(&grads).expect("all-reduce"));
                    let zero = median_ms(|| {
                        group.reduce_scatter(&share, &grads).expect("reduce-scatter");
                        group.all_gather(&grads, &share).expect("all-gather");
                    });
                    if rank == 0 {
                        println!(
                            "{}",
                            serde_json::json!({"elements": n, "mb": n as f64 * 4e-6, "all_reduce_ms": all_reduce, "reduce_scatter_all_gather_ms": zero})
                        );
                    }
                }
            })
        })
        .collect();
    for r in ranks {
        r.join().expect("a rank panicked");
    }
}
