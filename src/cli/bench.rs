//! `qgenome bench ...`: throughput of the pipeline stages, with same-run baselines.
//!
//! MB/s here is 10^6 bytes per second of secret (plaintext) processed.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::sharing::{Drbg, RandomSource, Scheme};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Split and combine throughput of the (k,n) scheme on one core, including random
    /// generation, with gfsplit (Shamir over GF(256)) on the same data as the baseline.
    Split(SplitArgs),
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Bytes of secret to split (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = super::parse_size)]
    pub size: u64,
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    #[arg(long, default_value_t = 3)]
    pub n: usize,
    /// Chunk size the secret is cut into, as the filesystem does.
    #[arg(long, default_value = "1M", value_parser = super::parse_size)]
    pub chunk: u64,
    /// Threads (1 = the single-core figure the targets are set for).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Passes over the data; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Skip the gfsplit baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Directory for the baseline's files (tmpfs keeps the disk out of the measurement).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::Split(args) => bench_split(&args),
        }
    }
}

/// CPU time of the whole process so far (all threads).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_split(args: &SplitArgs) -> anyhow::Result<()> {
    let scheme = Scheme::new(args.k, args.n)?;
    if args.size == 0 || args.chunk == 0 || args.passes == 0 || args.threads == 0 {
        bail!("--size, --chunk, --passes and --threads must be greater than zero");
    }
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    let chunk = usize::try_from(args.chunk).context("--chunk does not fit in memory")?;

    let mut data = vec![0u8; size];
    Drbg::from_os()?.fill(&mut data)?;
    // Like the write pipeline, each worker cycles a bounded set of in-flight chunk buffers
    // (the engine keeps at most 8 chunks of a file in flight), rather than writing every share
    // of the whole input to fresh memory once.
    const IN_FLIGHT: usize = 8;
    let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
    let per_thread = chunks.len().div_ceil(args.threads);
    let share_len = scheme.share_len(chunk.min(size));
    let subsets: Vec<Vec<usize>> = (0u32..1 << args.n)
        .filter(|m| m.count_ones() as usize == args.k)
        .map(|m| (0..args.n).filter(|i| m >> i & 1 == 1).collect())
        .collect();
    // workers[t][slot][share]; page-faulted before timing.
    let mut workers: Vec<Vec<Vec<Vec<u8>>>> = (0..args.threads)
        .map(|_| {
            (0..IN_FLIGHT)
                .map(|_| vec![vec![1u8; share_len]; args.n])
                .collect()
        })
        .collect();
    let mut outs: Vec<Vec<Vec<u8>>> = (0..args.threads)
        .map(|_| vec![vec![1u8; chunk]; IN_FLIGHT])
        .collect();

    let mut split_runs = Vec::new();
    let mut combine_runs = Vec::new();
    // On a shared machine the wall clock includes time other processes took from us; the
    // CPU-time rate (per thread, so comparable across --threads) is reported beside it.
    let mut split_cpu = Vec::new();
    let mut combine_cpu = Vec::new();
    for _ in 0..args.passes {
        let (start, cpu) = (Instant::now(), process_cpu());
        std::thread::scope(|s| -> anyhow::Result<()> {
            let handles: Vec<_> = workers
                .iter_mut()
                .zip(chunks.chunks(per_thread))
                .map(|(sets, mine)| {
                    let scheme = &scheme;
                    s.spawn(move || -> anyhow::Result<()> {
                        for (c, piece) in mine.iter().enumerate() {
                            let set = &mut sets[c % IN_FLIGHT];
                            let len = scheme.share_len(piece.len());
                            let mut refs: Vec<&mut [u8]> =
                                set.iter_mut().map(|v| &mut v[..len]).collect();
                            crate::sharing::with_thread_drbg(|rng| {
                                scheme.split(piece, rng, &mut refs)
                            })??;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("split worker"))
        })?;
        split_runs.push(mbps(args.size, start.elapsed()));
        split_cpu.push(mbps(args.size, (process_cpu() - cpu) / args.threads as u32));

        let (start, cpu) = (Instant::now(), process_cpu());
        std::thread::scope(|s| -> anyhow::Result<()> {
            let handles: Vec<_> = workers
                .iter()
                .zip(outs.iter_mut())
                .zip(chunks.chunks(per_thread))
                .map(|((sets, outs), mine)| {
                    let (scheme, subsets) = (&scheme, &subsets);
                    s.spawn(move || -> anyhow::Result<()> {
                        // After the split pass, slot s holds the last chunk i with i % IN_FLIGHT == s.
                        let held = |slot: usize| {
                            let i = (0..mine.len())
                                .rev()
                                .find(|i| i % IN_FLIGHT == slot)
                                .expect("slot used");
                            mine[i]
                        };
                        for c in 0..mine.len() {
                            let slot = c % IN_FLIGHT;
                            let plain = held(slot);
                            let len = scheme.share_len(plain.len());
                            // Rotate through every k-subset, as reads that route around sites do.
                            let given: Vec<(usize, &[u8])> = subsets[c % subsets.len()]
                                .iter()
                                .map(|&s| (s, &sets[slot][s][..len]))
                                .collect();
                            let out = &mut outs[slot][..plain.len()];
                            scheme.combine(&given, plain.len(), out)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("combine worker"))
        })?;
        combine_runs.push(mbps(args.size, start.elapsed()));
        combine_cpu.push(mbps(args.size, (process_cpu() - cpu) / args.threads as u32));
        // Untimed: each output slot must hold the chunk whose shares its slot held.
        for (outs, mine) in outs.iter().zip(chunks.chunks(per_thread)) {
            for (slot, out) in outs.iter().enumerate().take(mine.len()) {
                let i = (0..mine.len())
                    .rev()
                    .find(|i| i % IN_FLIGHT == slot)
                    .expect("slot used");
                if out[..mine[i].len()] != *mine[i] {
                    bail!("combine did not rebuild chunk {i}: the scheme is broken");
                }
            }
        }
    }
    drop(workers);
    drop(outs);
    let split_mbps = median(split_runs);
    let combine_mbps = median(combine_runs);
    let (split_cpu_mbps, combine_cpu_mbps) = (median(split_cpu), median(combine_cpu));
    // Seal + open of 1 MiB frames through a freshly provisioned link on the same tmpfs.
    let seal_mbps = crate::link::bench_seal(args.size, &args.dir)
        .with_context(|| format!("seal benchmark in {}", args.dir.display()))?;
    let gfsplit_mbps = if args.no_baseline {
        None
    } else {
        Some(gfsplit_baseline(&data, args)?)
    };
    if args.json {
        let mut v = json!({
            "k": args.k, "n": args.n, "size": args.size, "chunk": args.chunk,
            "threads": args.threads, "split_mbps": round1(split_mbps),
            "combine_mbps": round1(combine_mbps),
            "seal_mbps": round1(seal_mbps),
            "split_cpu_mbps": round1(split_cpu_mbps),
            "combine_cpu_mbps": round1(combine_cpu_mbps),
        });
        if let Some(g) = gfsplit_mbps {
            v["gfsplit_mbps"] = json!(round1(g));
            v["split_vs_gfsplit"] = json!(round1(split_mbps / g));
        }
        println!("{v}");
    } else {
        println!(
            "({},{}) scheme, {} MiB in {} KiB chunks, {} thread(s), median of {} passes",
            args.k,
            args.n,
            args.size >> 20,
            args.chunk >> 10,
            args.threads,
            args.passes
        );
        println!("split   {split_mbps:>9.1} MB/s wall, {split_cpu_mbps:>9.1} MB/s per CPU-second (including random generation)");
        println!(
            "combine {combine_mbps:>9.1} MB/s wall, {combine_cpu_mbps:>9.1} MB/s per CPU-second"
        );
        println!(
            "seal    {seal_mbps:>9.1} MB/s (seal + open of 1 MiB frames, pools in {})",
            args.dir.display()
        );
        if let Some(g) = gfsplit_mbps {
            println!(
                "gfsplit {g:>9.1} MB/s (-n {} -m {}, same data) -> split is {:.1}x",
                args.k,
                args.n,
                split_mbps / g
            );
        }
    }
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Time `gfsplit -n k -m n` on the same bytes, from and to tmpfs.
fn gfsplit_baseline(data: &[u8], args: &SplitArgs) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("qgenome-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a scratch directory in {}", args.dir.display()))?;
    let input = dir.path().join("secret");
    std::fs::write(&input, data).with_context(|| format!("writing {}", input.display()))?;
    let start = Instant::now();
    let status = Command::new("gfsplit")
        .arg("-n")
        .arg(args.k.to_string())
        .arg("-m")
        .arg(args.n.to_string())
        .arg(&input)
        .arg(dir.path().join("share"))
        .status()
        .context("running gfsplit (Debian package libgfshare-bin; `make deps` installs it)")?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("gfsplit failed: {status}");
    }
    Ok(mbps(data.len() as u64, elapsed))
}
