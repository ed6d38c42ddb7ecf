//! `qgenome bench ceiling`: the most any implementation of the design could store and restore
//! through the local deployment of `bench e2e` on this machine's cores.
//!
//! Each kind of work the design requires of every plaintext byte is timed alone, on its own,
//! in CPU time: the chunk's SHA-256 (the Merkle leaf), the split and the combine, the
//! one-time-pad seal and open of a share sent over a link (key destruction included), a share's
//! trip through a loopback TCP socket (a remote site) and a Unix socket (the home site), its copy
//! into and out of a volume file in `--dir`, and the copy across the FUSE boundary. Summed with
//! how many bytes of each a plaintext byte causes, they give the CPU a store and a restore of
//! one MB need at the least; the machine's cores divided by that is the ceiling.
//!
//! It is a lower bound on the cost, so an upper bound on the rate: everything the
//! implementation adds is left out (threads handing chunks on, locks, wake-ups, the sites'
//! at-rest checksum, io_uring, the catalog, page faults of fresh volume pages, `dd` and the
//! reader themselves), the user-space `memcpy` standing in for the FUSE copy is cheaper than
//! the kernel's, and all cores are taken as busy all the time.
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::bench::{median, round1, round2, split_rates};
use crate::sharing::{Drbg, RandomSource, Scheme};

const MB: f64 = 1e6;
/// Chunks cycled through by every stage, as the write pipeline keeps at most 8 in flight: the
/// data is as warm as it is there.
const IN_FLIGHT: usize = 8;

#[derive(Debug, Args)]
pub struct CeilingArgs {
    /// Bytes each stage processes per pass (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = super::parse_size)]
    pub size: u64,
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    #[arg(long, default_value_t = 3)]
    pub n: usize,
    /// Chunk size of the mount.
    #[arg(long, default_value = "1M", value_parser = super::parse_size)]
    pub chunk: u64,
    /// Passes per stage; the median is used.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Where the volume file and the link's key pools go, as in `bench e2e` (tmpfs by default).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One kind of work: its rate on its own bytes, and how many of its bytes one plaintext byte
/// causes in a store and in a restore.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: &'static str,
    pub what: &'static str,
    /// MB of the stage's own bytes per CPU-second.
    pub cpu_mbps: f64,
    pub store_bytes: f64,
    pub restore_bytes: f64,
}

impl Stage {
    /// CPU milliseconds this stage takes per plaintext MB of a store (`store`) or a restore.
    fn ms_per_mb(&self, store: bool) -> f64 {
        let bytes = if store {
            self.store_bytes
        } else {
            self.restore_bytes
        };
        bytes * 1000.0 / self.cpu_mbps
    }
}

#[derive(Debug, Clone)]
pub struct Ceiling {
    pub cores: usize,
    pub stages: Vec<Stage>,
}

impl Ceiling {
    /// CPU milliseconds per plaintext MB, at the least.
    pub fn ms_per_mb(&self, store: bool) -> f64 {
        self.stages.iter().map(|s| s.ms_per_mb(store)).sum()
    }

    /// MB/s with every core busy doing nothing but the required work.
    pub fn mbps(&self, store: bool) -> f64 {
        self.cores as f64 * 1000.0 / self.ms_per_mb(store)
    }

    pub fn json(&self) -> serde_json::Value {
        let stages: Vec<_> = self
            .stages
            .iter()
            .map(|s| {
                json!({
                    "stage": s.name,
                    "cpu_mbps": round1(s.cpu_mbps),
                    "store_bytes_per_byte": round2(s.store_bytes),
                    "restore_bytes_per_byte": round2(s.restore_bytes),
                    "store_ms_per_mb": round2(s.ms_per_mb(true)),
                    "restore_ms_per_mb": round2(s.ms_per_mb(false)),
                })
            })
            .collect();
        json!({
            "cores": self.cores,
            "store_ms_per_mb": round2(self.ms_per_mb(true)),
            "restore_ms_per_mb": round2(self.ms_per_mb(false)),
            "store_ceiling_mbps": round1(self.mbps(true)),
            "restore_ceiling_mbps": round1(self.mbps(false)),
            "stages": stages,
        })
    }

    pub fn print(&self) {
        println!(
            "{:<12} {:>12} {:>16} {:>18}   what",
            "stage", "MB/CPU-s", "store ms/MB (x)", "restore ms/MB (x)"
        );
        for s in &self.stages {
            println!(
                "{:<12} {:>12.1} {:>9.2} ({:.1}) {:>11.2} ({:.1})   {}",
                s.name,
                s.cpu_mbps,
                s.ms_per_mb(true),
                s.store_bytes,
                s.ms_per_mb(false),
                s.restore_bytes,
                s.what
            );
        }
        println!(
            "{:<12} {:>12} {:>16.2} {:>18.2}",
            "sum",
            "",
            self.ms_per_mb(true),
            self.ms_per_mb(false)
        );
        println!(
            "ceiling on {} core(s): store {:.1} MB/s, restore {:.1} MB/s (every core busy with the required work alone)",
            self.cores,
            self.mbps(true),
            self.mbps(false)
        );
    }
}

pub fn run(args: &CeilingArgs) -> anyhow::Result<()> {
    let c = measure(
        args.size,
        args.k,
        args.n,
        args.chunk,
        args.passes,
        &args.dir,
    )?;
    if args.json {
        let mut v = c.json();
        v["k"] = json!(args.k);
        v["n"] = json!(args.n);
        v["chunk"] = json!(args.chunk);
        v["size"] = json!(args.size);
        v["dir"] = json!(args.dir);
        println!("{v}");
    } else {
        println!(
            "qgenome bench ceiling: ({},{}) scheme, {} KiB chunks, {} MiB per stage, median of {} passes, volume and pools in {}",
            args.k,
            args.n,
            args.chunk >> 10,
            args.size >> 20,
            args.passes,
            args.dir.display()
        );
        c.print();
    }
    Ok(())
}

/// Time every stage and count its bytes for a (k,n) deployment like `bench e2e`'s: share 0 on
/// the home site over its Unix socket with no pad, the others on remote sites over sealed TCP
/// links; a restore reads the home share and k-1 remote ones.
pub fn measure(
    size: u64,
    k: usize,
    n: usize,
    chunk: u64,
    passes: usize,
    dir: &Path,
) -> anyhow::Result<Ceiling> {
    let scheme = Scheme::new(k, n)?;
    if size == 0 || passes == 0 {
        bail!("--size and --passes must be greater than zero");
    }
    if !(4 << 10..=16 << 20).contains(&chunk) {
        bail!("--chunk must be between 4K and 16M, as the mount's chunk_size");
    }
    let chunk = usize::try_from(chunk).context("--chunk does not fit in memory")?;
    let mut data = vec![0u8; IN_FLIGHT * chunk];
    Drbg::from_os()?.fill(&mut data)?;
    let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
    // Every stage processes `size` bytes of its own, cycling through the in-flight chunks.
    let rounds = usize::try_from(size.div_ceil(chunk as u64)).context("--size")?;
    let bytes = (rounds * chunk) as u64;
    let each = |c: usize| chunks[c % IN_FLIGHT];
    let share = scheme.share_len(chunk) as f64 / chunk as f64;
    let (remote_store, remote_restore) = ((n - 1) as f64, (k - 1) as f64);

    let sha = cpu_rate(passes, bytes, || {
        for c in 0..rounds {
            std::hint::black_box(crate::catalog::merkle::LeafHash::CURRENT.hash(each(c)));
        }
        Ok(())
    })?;
    let cycled: Vec<&[u8]> = (0..rounds).map(each).collect();
    let split = split_rates(&scheme, &cycled, 1, passes)?;
    let seal = crate::link::bench_seal_detail(size, dir)
        .with_context(|| format!("seal benchmark in {}", dir.display()))?;
    let tcp = socket_rate(passes, bytes, chunk, tcp_pair()?, "loopback TCP")?;
    let unix = socket_rate(passes, bytes, chunk, unix_pair()?, "Unix")?;
    let (vol_write, vol_read) = volume_rates(passes, rounds, &chunks, dir)?;
    let mut outs = vec![vec![1u8; chunk]; IN_FLIGHT];
    let copy = cpu_rate(passes, bytes, || {
        for c in 0..rounds {
            outs[c % IN_FLIGHT].copy_from_slice(each(c));
            std::hint::black_box(&outs[c % IN_FLIGHT]);
        }
        Ok(())
    })?;

    let stage = |name, what, cpu_mbps, store_bytes, restore_bytes| Stage {
        name,
        what,
        cpu_mbps,
        store_bytes,
        restore_bytes,
    };
    let stages = vec![
        stage(
            "sha256",
            "the chunk's Merkle leaf, made on store and checked on restore",
            sha,
            1.0,
            1.0,
        ),
        stage(
            "split",
            "the (k,n) split, random pieces included",
            split.split_cpu,
            1.0,
            0.0,
        ),
        stage(
            "combine",
            "rebuilding a chunk from k shares",
            split.combine_cpu,
            0.0,
            1.0,
        ),
        stage(
            "seal+open",
            "one-time pad and tag of a share on a link, both ends, key destruction included",
            seal.cpu_mbps,
            remote_store * share,
            remote_restore * share,
        ),
        stage(
            "tcp",
            "a share through a loopback TCP socket (a remote site), both ends",
            tcp,
            remote_store * share,
            remote_restore * share,
        ),
        stage(
            "unix",
            "a share through a Unix socket (the home site), both ends",
            unix,
            share,
            share,
        ),
        stage(
            "vol-write",
            "a share copied into a written-before volume file",
            vol_write,
            n as f64 * share,
            0.0,
        ),
        stage(
            "vol-read",
            "a share copied out of the volume file",
            vol_read,
            0.0,
            k as f64 * share,
        ),
        stage(
            "fuse-copy",
            "the plaintext across the FUSE boundary (a user-space memcpy)",
            copy,
            1.0,
            1.0,
        ),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    Ok(Ceiling { cores, stages })
}

/// MB per CPU-second of this process (every thread of it) over `passes` runs of `f`, each of
/// `bytes`; the median.
fn cpu_rate(
    passes: usize,
    bytes: u64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut rates = Vec::with_capacity(passes);
    for _ in 0..passes {
        let cpu = crate::process_cpu();
        f()?;
        let spent = (crate::process_cpu() - cpu).max(Duration::from_nanos(1));
        rates.push(bytes as f64 / spent.as_secs_f64() / MB);
    }
    Ok(median(rates))
}

/// Both ends of a socket give up after this: an end that fails must not leave the other
/// blocked for good.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected loopback TCP pair, writer first.
fn tcp_pair() -> anyhow::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback socket")?;
    let tx =
        std::net::TcpStream::connect(listener.local_addr()?).context("connecting over loopback")?;
    let (rx, _) = listener.accept().context("accepting over loopback")?;
    tx.set_nodelay(true)?;
    tx.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    rx.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    Ok((tx, rx))
}

/// A connected Unix socket pair, writer first.
fn unix_pair() -> anyhow::Result<(UnixStream, UnixStream)> {
    let (tx, rx) = UnixStream::pair().context("a Unix socket pair")?;
    tx.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    rx.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    Ok((tx, rx))
}

/// A writer thread sends `bytes` (a whole number of chunks) through `tx`, this thread reads
/// them from `rx`: both ends' CPU (and the kernel's, in their system time) per MB.
fn socket_rate<S: Read + Write + Send>(
    passes: usize,
    bytes: u64,
    chunk: usize,
    (mut tx, mut rx): (S, S),
    what: &str,
) -> anyhow::Result<f64> {
    let rounds = bytes / chunk as u64;
    let out = vec![7u8; chunk];
    let mut inb = vec![0u8; chunk];
    cpu_rate(passes, bytes, || {
        std::thread::scope(|s| {
            let (out, tx) = (&out, &mut tx);
            let writer = s.spawn(move || -> std::io::Result<()> {
                for _ in 0..rounds {
                    tx.write_all(out)?;
                }
                Ok(())
            });
            for _ in 0..rounds {
                rx.read_exact(&mut inb)
                    .with_context(|| format!("reading from the {what} socket"))?;
            }
            writer
                .join()
                .expect("socket writer")
                .with_context(|| format!("writing to the {what} socket"))
        })
    })
}

/// Copies of chunks into and out of a file in `dir` that was written once before (the cost of
/// the copy, not of allocating fresh pages): `(write, read)` MB per CPU-second.
fn volume_rates(
    passes: usize,
    rounds: usize,
    chunks: &[&[u8]],
    dir: &Path,
) -> anyhow::Result<(f64, f64)> {
    const SLOTS: usize = 64;
    let chunk = chunks[0].len();
    let file = tempfile::tempfile_in(dir)
        .with_context(|| format!("creating a volume file in {}", dir.display()))?;
    let at = |c: usize| ((c % SLOTS) * chunk) as u64;
    for c in 0..SLOTS {
        file.write_all_at(chunks[c % chunks.len()], at(c))
            .with_context(|| format!("writing a volume file in {}", dir.display()))?;
    }
    let bytes = (rounds * chunk) as u64;
    let write = cpu_rate(passes, bytes, || {
        for c in 0..rounds {
            file.write_all_at(chunks[c % chunks.len()], at(c))?;
        }
        Ok(())
    })?;
    let mut buf = vec![0u8; chunk];
    let read = cpu_rate(passes, bytes, || {
        for c in 0..rounds {
            file.read_exact_at(&mut buf, at(c))?;
            std::hint::black_box(&buf);
        }
        Ok(())
    })?;
    Ok((write, read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(cpu_mbps: f64, store_bytes: f64, restore_bytes: f64) -> Stage {
        Stage {
            name: "s",
            what: "",
            cpu_mbps,
            store_bytes,
            restore_bytes,
        }
    }

    #[test]
    fn the_ceiling_is_the_cores_over_the_summed_cost_per_plaintext_mb() {
        // 1000 MB/CPU-s for 2 bytes per byte = 2 ms; 500 for 1 = 2 ms; 4 ms in all.
        let c = Ceiling {
            cores: 2,
            stages: vec![stage(1000.0, 2.0, 1.0), stage(500.0, 1.0, 0.0)],
        };
        assert!((c.ms_per_mb(true) - 4.0).abs() < 1e-9);
        assert!((c.mbps(true) - 500.0).abs() < 1e-9);
        assert!((c.ms_per_mb(false) - 1.0).abs() < 1e-9);
        assert!((c.mbps(false) - 2000.0).abs() < 1e-9);
    }
}
