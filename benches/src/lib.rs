//! A small bench harness: each measurement is reported next to a baseline
//! measured in the same run, as a ratio, so figures survive a noisy machine.
//!
//! `cargo bench -p lever-benches` runs the full sampling; add `-- --quick`
//! (or set `LEVER_BENCH_QUICK=1`) for the few-second mode CI uses so the
//! benches cannot rot.

#![allow(clippy::unwrap_used, unreachable_pub)]

use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Median time per iteration.
    pub median: Duration,
    /// 90th percentile of the per-sample means.
    pub p90: Duration,
    pub iterations: u64,
}

#[derive(Debug)]
pub struct Harness {
    pub quick: bool,
    samples: usize,
    sample_time: Duration,
}

impl Harness {
    pub fn from_env() -> Harness {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var_os("LEVER_BENCH_QUICK").is_some_and(|v| v != "0");
        if quick {
            Harness {
                quick,
                samples: 7,
                sample_time: Duration::from_millis(20),
            }
        } else {
            Harness {
                quick,
                samples: 31,
                sample_time: Duration::from_millis(150),
            }
        }
    }

    /// Runs `f` repeatedly: a warm-up, then `samples` samples of about
    /// `sample_time` each; returns the median and p90 time per call.
    pub fn measure<R>(&self, name: &str, mut f: impl FnMut() -> R) -> Sample {
        // Calibrate: how many calls fill one sample.
        let mut per_sample = 1u64;
        loop {
            let t = Instant::now();
            for _ in 0..per_sample {
                black_box(f());
            }
            if t.elapsed() >= self.sample_time / 4 || per_sample >= 1 << 24 {
                let scale = self.sample_time.as_secs_f64() / t.elapsed().as_secs_f64().max(1e-9);
                per_sample = ((per_sample as f64 * scale).ceil() as u64).clamp(1, 1 << 26);
                break;
            }
            per_sample *= 2;
        }
        let mut means: Vec<Duration> = (0..self.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per_sample {
                    black_box(f());
                }
                t.elapsed() / u32::try_from(per_sample).unwrap_or(u32::MAX)
            })
            .collect();
        means.sort();
        let s = Sample {
            median: means[means.len() / 2],
            p90: means[(means.len() * 9) / 10],
            iterations: per_sample * self.samples as u64,
        };
        println!(
            "  {name:<48} median {:>10}  p90 {:>10}  ({} calls)",
            fmt(s.median),
            fmt(s.p90),
            s.iterations
        );
        s
    }

    /// Prints `subject / baseline` for the medians.
    pub fn ratio(&self, what: &str, subject: Sample, baseline: Sample) -> f64 {
        let r = subject.median.as_secs_f64() / baseline.median.as_secs_f64().max(1e-12);
        if r < 0.1 {
            println!("  => {what}: {r:.5}x the baseline ({:.0}x faster)", 1.0 / r);
        } else {
            println!("  => {what}: {r:.2}x the baseline");
        }
        r
    }
}

pub fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}
