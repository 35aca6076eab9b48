//! Round-trip statistics, computed as baseline.md computes them.

use std::time::Duration;

/// Summary of one benchmark configuration.
#[derive(Clone, Debug)]
pub(crate) struct Summary {
    pub(crate) count: usize,
    pub(crate) avg_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p75_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
}

impl Summary {
    pub(crate) fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let pct = |p: f64| {
            let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
            samples.get(i).copied().map_or(0.0, us)
        };
        let total: Duration = samples.iter().sum();
        Self {
            count: samples.len(),
            avg_us: if samples.is_empty() {
                0.0
            } else {
                us(total) / samples.len() as f64
            },
            p50_us: pct(0.50),
            p75_us: pct(0.75),
            p90_us: pct(0.90),
            p99_us: pct(0.99),
        }
    }

    /// baseline.md's throughput: both directions' bytes over the median round trip, GB/s.
    pub(crate) fn throughput_gbps(&self, size: usize) -> f64 {
        if self.p50_us == 0.0 {
            0.0
        } else {
            2.0 * size as f64 / (self.p50_us * 1e-6) / 1e9
        }
    }
}

/// Human-readable byte size: 8 B, 64 KiB, 16 MiB.
pub(crate) fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Parses "8,1K,64K,1M,16M" into bytes.
pub(crate) fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let (num, mult) = match part.chars().last() {
                Some('K' | 'k') => (&part[..part.len() - 1], 1 << 10),
                Some('M' | 'm') => (&part[..part.len() - 1], 1 << 20),
                Some('G' | 'g') => (&part[..part.len() - 1], 1 << 30),
                _ => (part, 1),
            };
            num.parse::<usize>()
                .map(|n| n * mult)
                .map_err(|_| format!("bad size {part:?} (use e.g. 8,1K,64K,1M)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!(
            parse_sizes("8,1K,64k,1M,2G").unwrap(),
            [8, 1024, 65536, 1 << 20, 2 << 30]
        );
        assert!(parse_sizes("8,x").is_err());
        assert_eq!(size_label(8), "8 B");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(16 << 20), "16 MiB");
        assert_eq!(size_label(1500), "1500 B");
    }

    #[test]
    fn summary_percentiles_and_throughput() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let sum = Summary::of(&mut s);
        assert_eq!(sum.count, 100);
        assert!((sum.p50_us - 51.0).abs() < 1e-6, "{}", sum.p50_us);
        assert!((sum.p99_us - 99.0).abs() < 1e-6, "{}", sum.p99_us);
        assert!((sum.avg_us - 50.5).abs() < 1e-6);
        // 2 x 1 MB over 51 µs.
        assert!((sum.throughput_gbps(1_000_000) - 2.0 / 51e-6 / 1e3).abs() < 1e-6);
    }
}
