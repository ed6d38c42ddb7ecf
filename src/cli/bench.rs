//! `qgenome bench ...`: throughput of the pipeline stages, with same-run baselines.
//!
//! MB/s here is 10^6 bytes per second of secret (plaintext) processed.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::keys::pool::PoolSizes;
use crate::sharing::{Drbg, RandomSource, Scheme};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Split and combine throughput of the (k,n) scheme on one core, including random
    /// generation, with gfsplit (Shamir over GF(256)) on the same data as the baseline.
    Split(SplitArgs),
    /// Store and restore throughput through a whole local deployment (three mountd sites,
    /// one-time-pad links, the FUSE mount): written with dd bs=1M, read back 1 MiB at a time
    /// and checked as it is read; gocryptfs, measured the same way, is the baseline.
    E2e(E2eArgs),
    /// The most any implementation of the design could store and restore through the
    /// deployment of `bench e2e` on this machine: each kind of work the design requires of a
    /// byte (SHA-256, split, seal, sockets, volume copies...) timed alone in CPU time, summed per
    /// plaintext MB, and the cores divided by that.
    Ceiling(super::ceiling::CeilingArgs),
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

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Bytes of random data to store and restore (K, M, G suffixes).
    #[arg(long, default_value = "2G", value_parser = super::parse_size)]
    pub size: u64,
    /// Where the source file, volumes, catalog and mountpoint go (tmpfs by default, so the
    /// pipeline and not the disk is measured). Key pools go here too when they fit.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Where the link key pools go. Default: --dir when everything fits there (keeping at
    /// least 3 GiB of memory free when --dir is tmpfs), else /var/tmp.
    #[arg(long)]
    pub key_dir: Option<PathBuf>,
    /// Chunk size of the mount.
    #[arg(long, default_value = "1M", value_parser = super::parse_size)]
    pub chunk: u64,
    /// Block size of the dd that writes the file and of the reads that restore it.
    #[arg(long, default_value = "1M", value_parser = super::parse_size)]
    pub bs: u64,
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    #[arg(long, default_value_t = 3)]
    pub n: usize,
    /// Skip the gocryptfs baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Skip the ceiling (`qgenome bench ceiling` on --dir, measured before the store).
    #[arg(long)]
    pub no_ceiling: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::Split(args) => bench_split(&args),
            BenchCommand::E2e(args) => bench_e2e(&args),
            BenchCommand::Ceiling(args) => super::ceiling::run(&args),
        }
    }
}

pub(crate) fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Split, combine and copy-floor rates of one `bench split` configuration, medians of the passes.
pub(super) struct SplitRates {
    threads: usize,
    split: f64,
    combine: f64,
    /// Per CPU-second of each thread: on a shared machine the wall clock includes time other
    /// processes took from us; this rate, comparable across thread counts, does not.
    pub(super) split_cpu: f64,
    pub(super) combine_cpu: f64,
    /// Each chunk copied into its n share buffers, nothing else: the floor under any split.
    floor: f64,
}

impl SplitRates {
    fn json(&self, gfsplit: Option<f64>) -> serde_json::Value {
        let mut v = json!({
            "threads": self.threads,
            "split_mbps": round1(self.split),
            "combine_mbps": round1(self.combine),
            "split_cpu_mbps": round1(self.split_cpu),
            "combine_cpu_mbps": round1(self.combine_cpu),
            "copy_floor_mbps": round1(self.floor),
            "split_vs_copy_floor": round2(self.split / self.floor),
        });
        if let Some(g) = gfsplit {
            v["split_vs_gfsplit"] = json!(round1(self.split / g));
            v["copy_floor_vs_gfsplit"] = json!(round1(self.floor / g));
        }
        v
    }

    fn print(&self, gfsplit: Option<f64>, n: usize) {
        println!(
            "split   {:>9.1} MB/s wall, {:>9.1} MB/s per CPU-second (including random generation)",
            self.split, self.split_cpu
        );
        println!(
            "combine {:>9.1} MB/s wall, {:>9.1} MB/s per CPU-second",
            self.combine, self.combine_cpu
        );
        println!(
            "floor   {:>9.1} MB/s wall: each chunk copied into its {n} share buffers, nothing else (split reaches {:.0}% of it)",
            self.floor,
            100.0 * self.split / self.floor
        );
        if let Some(g) = gfsplit {
            println!(
                "        split is {:.1}x gfsplit, the copy floor {:.1}x",
                self.split / g,
                self.floor / g
            );
        }
    }
}

/// Measure split, combine and the copy floor over `chunks` with `threads` threads.
pub(super) fn split_rates(
    scheme: &Scheme,
    chunks: &[&[u8]],
    threads: usize,
    passes: usize,
) -> anyhow::Result<SplitRates> {
    // Like the write pipeline, each worker cycles a bounded set of in-flight chunk buffers
    // (the engine keeps at most 8 chunks of a file in flight), rather than writing every share
    // of the whole input to fresh memory once.
    const IN_FLIGHT: usize = 8;
    let (n, k) = (scheme.n(), scheme.k());
    let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let chunk = chunks.first().map_or(0, |c| c.len());
    let per_thread = chunks.len().div_ceil(threads);
    let share_len = scheme.share_len(chunk);
    let subsets = crate::sharing::k_subsets(n, k);
    // workers[t][slot][share]; page-faulted before timing.
    let mut workers: Vec<Vec<Vec<Vec<u8>>>> = (0..threads)
        .map(|_| {
            (0..IN_FLIGHT)
                .map(|_| vec![vec![1u8; share_len]; n])
                .collect()
        })
        .collect();
    let mut outs: Vec<Vec<Vec<u8>>> = (0..threads)
        .map(|_| vec![vec![1u8; chunk]; IN_FLIGHT])
        .collect();
    // After a pass, slot s of a thread holds the last of its chunks i with i % IN_FLIGHT == s.
    let held = |mine: &[&[u8]], slot: usize| {
        (0..mine.len())
            .rev()
            .find(|i| i % IN_FLIGHT == slot)
            .expect("slot used")
    };

    let (mut split, mut combine, mut split_cpu, mut combine_cpu, mut floor) =
        (vec![], vec![], vec![], vec![], vec![]);
    let per_thread_cpu = |cpu: std::time::Duration| cpu / threads as u32;
    for _ in 0..passes {
        let (start, cpu) = (Instant::now(), crate::process_cpu());
        each_chunk(&mut workers, chunks, per_thread, |sets, c, mine| {
            let (set, piece) = (&mut sets[c % IN_FLIGHT], mine[c]);
            let len = scheme.share_len(piece.len());
            let mut refs: Vec<&mut [u8]> = set.iter_mut().map(|v| &mut v[..len]).collect();
            crate::sharing::with_thread_drbg(|rng| scheme.split(piece, rng, &mut refs))??;
            Ok(())
        })?;
        split.push(mbps(size, start.elapsed()));
        split_cpu.push(mbps(size, per_thread_cpu(crate::process_cpu() - cpu)));

        let (start, cpu) = (Instant::now(), crate::process_cpu());
        let mut state: Vec<_> = workers.iter().zip(outs.iter_mut()).collect();
        each_chunk(&mut state, chunks, per_thread, |(sets, outs), c, mine| {
            let slot = c % IN_FLIGHT;
            let plain = mine[held(mine, slot)];
            let len = scheme.share_len(plain.len());
            // Rotate through every k-subset, as reads that route around sites do.
            let given: Vec<(usize, &[u8])> = subsets[c % subsets.len()]
                .iter()
                .map(|&s| (s, &sets[slot][s][..len]))
                .collect();
            scheme.combine(&given, plain.len(), &mut outs[slot][..plain.len()])?;
            Ok(())
        })?;
        combine.push(mbps(size, start.elapsed()));
        combine_cpu.push(mbps(size, per_thread_cpu(crate::process_cpu() - cpu)));
        // Untimed: each output slot must hold the chunk whose shares its slot held.
        for (outs, mine) in outs.iter().zip(chunks.chunks(per_thread)) {
            for (slot, out) in outs.iter().enumerate().take(mine.len()) {
                let i = held(mine, slot);
                if out[..mine[i].len()] != *mine[i] {
                    bail!("combine did not rebuild chunk {i}: the scheme is broken");
                }
            }
        }
    }
    for _ in 0..passes {
        let start = Instant::now();
        each_chunk(&mut workers, chunks, per_thread, |sets, c, mine| {
            let piece = mine[c];
            sets[c % IN_FLIGHT]
                .iter_mut()
                .for_each(|v| v[..piece.len()].copy_from_slice(piece));
            Ok(())
        })?;
        floor.push(mbps(size, start.elapsed()));
    }
    Ok(SplitRates {
        threads,
        split: median(split),
        combine: median(combine),
        split_cpu: median(split_cpu),
        combine_cpu: median(combine_cpu),
        floor: median(floor),
    })
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
    let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
    let rates = split_rates(&scheme, &chunks, args.threads, args.passes)?;
    // The same on every core, when that is more threads than asked for: gfsplit has one
    // thread, the filesystem splits chunks on all cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all_cores = if cores > args.threads {
        Some(split_rates(&scheme, &chunks, cores, args.passes)?)
    } else {
        None
    };
    // Seal + open of 1 MiB frames through a freshly provisioned link on the same tmpfs.
    let seal = crate::link::bench_seal_detail(args.size, &args.dir)
        .with_context(|| format!("seal benchmark in {}", args.dir.display()))?;
    let seal_mbps = seal.wall_mbps;
    let gfsplit_mbps = if args.no_baseline {
        None
    } else {
        Some(gfsplit_baseline(&data, args)?)
    };
    if args.json {
        let mut v = rates.json(gfsplit_mbps);
        v["k"] = json!(args.k);
        v["n"] = json!(args.n);
        v["size"] = json!(args.size);
        v["chunk"] = json!(args.chunk);
        v["seal_mbps"] = json!(round1(seal_mbps));
        v["seal_cpu_mbps"] = json!(round1(seal.cpu_mbps));
        v["seal_pools_huge_pages"] = json!(seal.huge_pages);
        if let Some(g) = gfsplit_mbps {
            v["gfsplit_mbps"] = json!(round1(g));
        }
        if let Some(all) = &all_cores {
            v["all_cores"] = all.json(gfsplit_mbps);
        }
        println!("{v}");
    } else {
        println!(
            "({},{}) scheme, {} MiB in {} KiB chunks, median of {} passes",
            args.k,
            args.n,
            args.size >> 20,
            args.chunk >> 10,
            args.passes
        );
        if let Some(g) = gfsplit_mbps {
            println!(
                "gfsplit {g:>9.1} MB/s (-n {} -m {}, same data, one thread)",
                args.k, args.n
            );
        }
        println!("{} thread(s):", rates.threads);
        rates.print(gfsplit_mbps, args.n);
        println!(
            "seal    {seal_mbps:>9.1} MB/s wall, {:>9.1} MB/s per CPU-second (seal + open of 1 MiB frames, pools in {}{})",
            seal.cpu_mbps,
            args.dir.display(),
            if seal.huge_pages { " on a tmpfs of huge pages" } else { "" }
        );
        if let Some(all) = &all_cores {
            println!("{} threads (every core):", all.threads);
            all.print(gfsplit_mbps, args.n);
        }
    }
    Ok(())
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Run `f(this thread's state, c, its chunks)` for every index `c` of each thread's run of
/// `per_thread` chunks, one thread per element of `state`.
fn each_chunk<T: Send>(
    state: &mut [T],
    chunks: &[&[u8]],
    per_thread: usize,
    f: impl Fn(&mut T, usize, &[&[u8]]) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = state
            .iter_mut()
            .zip(chunks.chunks(per_thread))
            .map(|(st, mine)| {
                let f = &f;
                s.spawn(move || (0..mine.len()).try_for_each(|c| f(st, c, mine)))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("bench worker"))
    })
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

// ---------------------------------------------------------------------------------------------
// bench e2e

/// Volume and per-direction key pool size for storing `size` bytes in `chunk`-byte chunks.
///
/// A share is as long as its chunk (padded to a multiple of p-1), each stored in whole 4 KiB
/// blocks with its header; each sealed frame spends whole 4 KiB key blocks (4064 bytes of pad
/// and a MAC key slot each, so 0.8% above its payload, and one block at least), and the
/// sender reserves key ahead in its ledger. The slack covers all of that with room.
/// Bytes of each volume, and of each link's pools in the store direction (home → site: every
/// share a site stores) and in the reply direction (site → home: acknowledgements, and the
/// shares a read fetches from it). A read takes k shares, the home's first and the k-1 others
/// from the links with the most reply key left, so each of the n-1 links carries about
/// (k-1)/(n-1) of the file back, given a margin here for chunks read ahead.
fn e2e_sizes(size: u64, chunk: u64, k: usize, n: usize) -> (u64, PoolSizes) {
    let chunks = size.div_ceil(chunk.max(1));
    let volume = (size + size / 16 + chunks * 8192 + (256 << 20)).next_multiple_of(1 << 20);
    let pool =
        |carried: u64| (carried + size / 32 + chunks * 4096 + (64 << 20)).next_multiple_of(1 << 20);
    let read_share = (size as u128 * (k as u128 - 1)).div_ceil(n as u128 - 1) as u64;
    let pools = PoolSizes {
        a_to_b: pool(size),
        b_to_a: pool(read_share),
    };
    (volume, pools)
}

/// Bytes the run needs: the source file (and later the gocryptfs copy beside it), the n
/// volumes with the sites' indexes and the catalog, and the key pools (each of the n-1 links
/// has four: two directions at both ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Needs {
    source: u64,
    volumes: u64,
    /// Pools of the store direction (home → sites).
    store_keys: u64,
    /// Pools of the reply direction (sites → home).
    reply_keys: u64,
    /// What is left of the store direction's pools once the file is stored (at most).
    store_keys_after_store: u64,
}

impl Needs {
    fn keys(&self) -> u64 {
        self.store_keys + self.reply_keys
    }
}

fn e2e_needs(size: u64, chunk: u64, k: usize, n: usize) -> Needs {
    let (volume, pools) = e2e_sizes(size, chunk, k, n);
    let links = n as u64 - 1;
    let pool_file = |key: u64| 2 * links * (key + crate::keys::pool::HEADER_LEN);
    let store_keys = pool_file(pools.a_to_b);
    Needs {
        source: size,
        volumes: n as u64 * volume + (128 << 20),
        store_keys,
        reply_keys: pool_file(pools.b_to_a),
        // Each remote share spends at least its length of pad, destroyed at both ends.
        store_keys_after_store: store_keys.saturating_sub(2 * links * size),
    }
}

/// Memory kept free when putting data on a RAM-backed filesystem: for the run's processes
/// (all of them together peaked at 490 MiB resident in a 2G run) and everything else on the
/// machine. It was 4 GiB until session 27, which on this 23.6 GiB VM put every pool of a 2G
/// run on disk whenever less than 21.9 GiB happened to be available (one run in three).
const TMPFS_HEADROOM: u64 = 3 << 30;

/// Where the key pools, and if need be the volumes, go when --dir has no room for them.
const DISK_FALLBACK: &str = "/var/tmp";

/// Room on a filesystem for this run: free space, and for tmpfs also the memory available
/// minus [`TMPFS_HEADROOM`] (tmpfs reports its size limit, not what RAM can take).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Room {
    dev: u64,
    free: u64,
    tmpfs: bool,
}

impl Room {
    fn usable(&self, mem_available: u64) -> u64 {
        if self.tmpfs {
            self.free.min(mem_available.saturating_sub(TMPFS_HEADROOM))
        } else {
            self.free
        }
    }
}

/// Whether the key pools (`needs.store_keys + needs.reply_keys`) can go beside the source
/// (and the volumes, when they are there too) on the data filesystem.
fn keys_fit_with_data(data: Room, needs: Needs, volumes_on_data: bool, mem: u64) -> bool {
    let volumes = if volumes_on_data { needs.volumes } else { 0 };
    needs.source + volumes + needs.keys() <= data.usable(mem)
}

/// Whether the restore direction's pools, kept on disk while the file is stored, fit on the
/// data filesystem (tmpfs) once the store has destroyed the pads it used.
fn reply_keys_fit_after_store(data: Room, needs: Needs, volumes_on_data: bool, mem: u64) -> bool {
    let volumes = if volumes_on_data { needs.volumes } else { 0 };
    data.tmpfs
        && needs.source + volumes + needs.store_keys_after_store + needs.reply_keys
            <= data.usable(mem)
}

/// Where the key pools go when `--key-dir` does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeySplit {
    /// All on `--dir`, beside the source (and the volumes, when they are there).
    AllOnData,
    /// The store direction's pools (home → sites) on `--dir`, the other direction's (replies
    /// and the shares a read fetches) on disk while the file is stored. Used key is destroyed
    /// as it goes, so once the file is stored the restore direction's pools may fit on
    /// `--dir` too: then they are moved there before the restore (see
    /// [`Placement::reply_pools_to_ram`]), else the restore reads its pads from the disk.
    StoreOnData,
    /// All on disk.
    AllOnDisk,
}

fn key_split(data: Room, needs: Needs, volumes_on_data: bool, mem: u64) -> KeySplit {
    let store_only = Needs {
        reply_keys: 0,
        ..needs
    };
    if keys_fit_with_data(data, needs, volumes_on_data, mem) {
        KeySplit::AllOnData
    } else if keys_fit_with_data(data, store_only, volumes_on_data, mem) {
        KeySplit::StoreOnData
    } else {
        KeySplit::AllOnDisk
    }
}

/// Check that every `(dir, room, bytes, what)` fits: needs on one filesystem add up, and
/// needs on tmpfs mounts add up against the memory available.
fn check_room(items: &[(&std::path::Path, Room, u64, &str)], mem: u64) -> anyhow::Result<()> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut devs: Vec<u64> = items.iter().map(|i| i.1.dev).collect();
    devs.sort_unstable();
    devs.dedup();
    for dev in devs {
        let mine: Vec<_> = items.iter().filter(|i| i.1.dev == dev).collect();
        let total: u64 = mine.iter().map(|i| i.2).sum();
        let (dir, room) = (mine[0].0, mine[0].1);
        if total > room.usable(mem) {
            let what: Vec<&str> = mine.iter().map(|i| i.3).collect();
            bail!(
                "not enough space for {} in {}: needs {:.2} GiB, {:.2} GiB usable ({}); use a smaller --size, or --dir / --key-dir on a filesystem with more room",
                what.join(" and "),
                dir.display(),
                gib(total),
                gib(room.usable(mem)),
                if room.tmpfs {
                    format!(
                        "tmpfs: free space, or memory available less {} GiB kept free",
                        TMPFS_HEADROOM >> 30
                    )
                } else {
                    "free space".to_string()
                }
            );
        }
    }
    let in_memory: u64 = items.iter().filter(|i| i.1.tmpfs).map(|i| i.2).sum();
    if in_memory > mem.saturating_sub(TMPFS_HEADROOM) {
        bail!(
            "not enough memory for {:.2} GiB on tmpfs ({:.2} GiB available, {} GiB kept free); use a smaller --size or put --key-dir on disk",
            gib(in_memory),
            gib(mem),
            TMPFS_HEADROOM >> 30
        );
    }
    Ok(())
}

fn room(dir: &std::path::Path) -> anyhow::Result<Room> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let fs = nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    let md = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    Ok(Room {
        dev: std::os::unix::fs::MetadataExt::dev(&md),
        free: st.blocks_available() as u64 * st.fragment_size() as u64,
        tmpfs: fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
    })
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> anyhow::Result<u64> {
    mem_field("MemAvailable")
}

/// A `kB` field of /proc/meminfo, in bytes.
fn mem_field(name: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_mem_field(&text, name).with_context(|| format!("no {name} line in /proc/meminfo"))
}

fn parse_mem_field(meminfo: &str, name: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|l| l.split(':').next() == Some(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Longest wait for memory an earlier run freed (see [`settled_mem_available`]).
const MEM_SETTLE_MAX: Duration = Duration::from_secs(180);
/// How often `MemAvailable` is read while waiting.
const MEM_SETTLE_STEP: Duration = Duration::from_secs(2);
/// Samples (of [`MEM_SETTLE_STEP`]) over which `MemAvailable` must rise by
/// [`MEM_SETTLE_RISE`] for the wait to go on: 10 s.
const MEM_SETTLE_SPAN: usize = 5;
const MEM_SETTLE_RISE: u64 = 32 << 20;

/// What the memory available decides in `bench e2e`'s placement: whether the source and the
/// volumes fit on `--dir`, where the key pools go, and whether the restore direction's pools
/// move to `--dir` after the store.
fn placement_at(data: Room, needs: Needs, mem: u64) -> (bool, KeySplit, bool) {
    let split = key_split(data, needs, true, mem);
    (
        needs.source + needs.volumes <= data.usable(mem),
        split,
        split == KeySplit::StoreOnData && reply_keys_fit_after_store(data, needs, true, mem),
    )
}

/// `MemAvailable` once memory freed by an earlier run has come back. On this VM the memory of
/// a benchmark just ended (its tmpfs pools and volumes, its processes) returns to
/// `MemAvailable` over a minute or two, and the placement, and so the result, depends on it:
/// back to back, the same command put every pool on disk and stored at half the speed. So
/// when the machine's memory (`MemTotal`) would place more on a tmpfs `data` than what is
/// available now ([`placement_at`]), this waits while `MemAvailable` still rises, up to
/// [`MEM_SETTLE_MAX`], and notes the wait.
fn settled_mem_available(data: Room, needs: Needs, notes: &mut Vec<String>) -> anyhow::Result<u64> {
    if !data.tmpfs {
        return mem_available();
    }
    let best = placement_at(data, needs, mem_field("MemTotal")?);
    settle(
        |mem| placement_at(data, needs, mem) == best,
        mem_available,
        std::thread::sleep,
        notes,
    )
}

/// The wait of [`settled_mem_available`]: `sample` until `good` says the memory is enough, or
/// it stops rising by [`MEM_SETTLE_RISE`] over [`MEM_SETTLE_SPAN`] steps, or
/// [`MEM_SETTLE_MAX`] has passed (counted in steps slept).
fn settle(
    good: impl Fn(u64) -> bool,
    mut sample: impl FnMut() -> anyhow::Result<u64>,
    mut sleep: impl FnMut(Duration),
    notes: &mut Vec<String>,
) -> anyhow::Result<u64> {
    let mut seen = vec![sample()?];
    let steps = (MEM_SETTLE_MAX.as_secs() / MEM_SETTLE_STEP.as_secs()) as usize;
    while !good(seen[seen.len() - 1]) && seen.len() <= steps {
        let n = seen.len();
        if n > MEM_SETTLE_SPAN && seen[n - 1] < seen[n - 1 - MEM_SETTLE_SPAN] + MEM_SETTLE_RISE {
            break;
        }
        sleep(MEM_SETTLE_STEP);
        seen.push(sample()?);
    }
    let mem = seen[seen.len() - 1];
    if seen.len() > 1 {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        notes.push(format!(
            "waited {} s for memory to settle (an earlier run's comes back slowly): {:.1} GiB \
             available, from {:.1}{}",
            (seen.len() - 1) as u64 * MEM_SETTLE_STEP.as_secs(),
            gib(mem),
            gib(seen[0]),
            if good(mem) {
                ""
            } else {
                "; not enough for the placement the machine's memory allows"
            }
        ));
    }
    Ok(mem)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Write back dirty pages, then drop the page, dentry and inode caches (a cold read).
/// Returns false when not permitted (not root).
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Read `path` to its end `bs` bytes at a time (as `dd bs=` does) and return the XXH3-128
/// of what came back, to compare a restored file with its source.
fn read_hashed(path: &std::path::Path, bs: u64) -> anyhow::Result<u128> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; bs as usize];
    let mut hash = twox_hash::XxHash3_128::new();
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(hash.finish_128()),
            Ok(n) => hash.write(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// [`read_hashed`], timed like [`timed_dd`]. A restore is checked by the very read that is
/// timed: a second read would spend as much key again, and the pools are sized for one.
fn timed_read(path: &std::path::Path, bs: u64) -> anyhow::Result<(Timed, u128)> {
    let (start, busy) = (Instant::now(), machine_busy());
    let hash = read_hashed(path, bs)?;
    let timed = Timed {
        wall: start.elapsed(),
        busy: machine_busy().saturating_sub(busy),
    };
    Ok((timed, hash))
}

/// How long a copy took, and the CPU time the whole machine was busy meanwhile (every
/// process and the kernel: dd, FUSE, the daemons).
#[derive(Clone, Copy, Debug)]
struct Timed {
    wall: Duration,
    busy: Duration,
}

impl Timed {
    fn mbps(&self, bytes: u64) -> f64 {
        mbps(bytes, self.wall)
    }

    /// MB per busy CPU-second: what the work costs, which other tenants of a shared machine
    /// move far less than the wall-clock rate.
    fn cpu_mbps(&self, bytes: u64) -> f64 {
        mbps(bytes, self.busy)
    }
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq and softirq time of
/// all CPUs in /proc/stat), or zero when it cannot be read.
fn machine_busy() -> Duration {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    parse_busy_ticks(&text).map_or(Duration::ZERO, |t| {
        Duration::from_micros(t * 1_000_000 / hz)
    })
}

fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?)
}

/// `dd if=from of=to bs=bs`, timed from start to exit (so including the final close).
fn timed_dd(from: &std::path::Path, to: &std::path::Path, bs: u64) -> anyhow::Result<Timed> {
    let mut cmd = Command::new("dd");
    cmd.arg(format!("if={}", from.display()))
        .arg(format!("of={}", to.display()))
        .arg(format!("bs={bs}"))
        .arg("status=none");
    let (start, busy) = (Instant::now(), machine_busy());
    run_tool(&mut cmd)?;
    Ok(Timed {
        wall: start.elapsed(),
        busy: machine_busy().saturating_sub(busy),
    })
}

/// Fill `path` with `size` bytes from the DRBG (random data: nothing compresses or dedups).
fn write_random(path: &std::path::Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut rng = Drbg::from_os()?;
    let mut buf = vec![0u8; 8 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n])?;
        f.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A FUSE mountpoint to detach on drop (the gocryptfs baseline), even after an error.
struct FuseMount(Option<PathBuf>);

impl FuseMount {
    fn unmount(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.0.take() {
            run_tool(Command::new("fusermount3").arg("-u").arg(&p))
                .with_context(|| format!("unmounting {}", p.display()))?;
        }
        Ok(())
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&p)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&p)
                    .status();
            }
        }
    }
}

struct E2eRun {
    store: Timed,
    restore: Timed,
    status: serde_json::Value,
}

struct BaselineRun {
    write: Timed,
    read: Timed,
}

/// Point the deployment's key directories (`DIR/keys` for the home ends, `DIR/<site>/keys`
/// for the site ends; see `deploy::Deployment::start_sites`) at `key_dir`, on another
/// filesystem. Returns the directories that must hold pools once the sites started.
fn link_key_dirs(
    deploy_dir: &std::path::Path,
    key_dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut ends = Vec::new();
    let mut link = |target: PathBuf, at: PathBuf| -> anyhow::Result<()> {
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::os::unix::fs::symlink(&target, &at)
            .with_context(|| format!("linking {} to {}", at.display(), target.display()))?;
        ends.push(target);
        Ok(())
    };
    link(key_dir.join("home"), deploy_dir.join("keys"))?;
    for i in 1..n {
        let site = format!("site{i}");
        link(key_dir.join(&site), deploy_dir.join(&site).join("keys"))?;
    }
    Ok(ends)
}

const E2E_PATIENT: &str = "P0001";

/// Where one attempt puts the deployment, and the scratch directories it owns (removed on
/// drop, after the deployment that uses them has stopped).
struct Placement {
    deploy_parent: PathBuf,
    deploy_tmpfs: bool,
    key_parent: PathBuf,
    key_tmpfs: bool,
    /// Where the pools of the direction from the sites to the home go, when not with the others.
    b2a_parent: Option<PathBuf>,
    /// How the pools were split between --dir and the disk (None: --key-dir said where).
    split: Option<KeySplit>,
    /// Bytes of pools under `key_parent`.
    keys_here: u64,
    /// The restore direction's pools move from the disk to `--dir` between the store and the
    /// restore (see [`KeySplit::StoreOnData`]).
    reply_to_ram: bool,
    /// Declared before the directories so that it stops first.
    deployment: Option<crate::deploy::Deployment>,
    /// Tmpfs mounts of huge pages over the scratch directories in RAM (see
    /// [`crate::keys::tmpfs`]): unmounted after the deployment stops, before the directories
    /// are removed.
    huge: Vec<crate::keys::tmpfs::HugeTmpfs>,
    needs: Needs,
    /// A symlink to `deploy_scratch` from outside /dev (see [`Placement::start`]).
    _alias: Option<tempfile::TempDir>,
    key_scratch: Option<tempfile::TempDir>,
    b2a_scratch: Option<tempfile::TempDir>,
    /// Where the restore direction's pools move before the restore (`reply_to_ram`).
    b2a_ram: Option<tempfile::TempDir>,
    deploy_scratch: Option<tempfile::TempDir>,
}

impl Placement {
    /// Plan where the volumes and pools go, checking the space for them and the source.
    fn plan(args: &E2eArgs, needs: Needs, volumes_on_data: bool, mem: u64) -> anyhow::Result<Self> {
        let data_room = room(&args.dir)?;
        let deploy_parent = if volumes_on_data {
            args.dir.clone()
        } else {
            PathBuf::from(DISK_FALLBACK)
        };
        let deploy_room = room(&deploy_parent)?;
        // Pools are the largest part (four per link at one machine): they go to disk first,
        // half of them if that is enough, so that the volumes can stay on --dir.
        let disk = || PathBuf::from(DISK_FALLBACK);
        let split = match &args.key_dir {
            Some(_) => None,
            None => Some(key_split(data_room, needs, volumes_on_data, mem)),
        };
        let (key_parent, b2a_parent) = match (&args.key_dir, split) {
            (Some(d), _) => (d.clone(), None),
            (None, Some(KeySplit::StoreOnData)) => (args.dir.clone(), Some(disk())),
            (None, Some(KeySplit::AllOnDisk)) => (disk(), None),
            (None, _) => (args.dir.clone(), None),
        };
        std::fs::create_dir_all(&key_parent)
            .with_context(|| format!("creating {}", key_parent.display()))?;
        let key_room = room(&key_parent)?;
        let keys_here = if b2a_parent.is_some() {
            needs.store_keys
        } else {
            needs.keys()
        };
        let reply_to_ram = split == Some(KeySplit::StoreOnData)
            && reply_keys_fit_after_store(data_room, needs, volumes_on_data, mem);
        let mut items = vec![
            (args.dir.as_path(), data_room, needs.source, "the source"),
            (
                deploy_parent.as_path(),
                deploy_room,
                needs.volumes,
                "the volumes",
            ),
            (key_parent.as_path(), key_room, keys_here, "the key pools"),
        ];
        let b2a_room = match &b2a_parent {
            Some(d) => Some((d.as_path(), room(d)?)),
            None => None,
        };
        if let Some((d, r)) = b2a_room {
            items.push((d, r, needs.reply_keys, "the restore direction's key pools"));
        }
        check_room(&items, mem)?;
        Ok(Self {
            deploy_tmpfs: deploy_room.tmpfs,
            key_tmpfs: key_room.tmpfs,
            deploy_parent,
            key_parent,
            b2a_parent,
            split,
            keys_here,
            reply_to_ram,
            deployment: None,
            huge: Vec::new(),
            needs,
            _alias: None,
            key_scratch: None,
            b2a_scratch: None,
            b2a_ram: None,
            deploy_scratch: None,
        })
    }

    /// Provision pools, format volumes, start the sites and mount.
    fn start(&mut self, args: &E2eArgs) -> anyhow::Result<()> {
        let scratch = |parent: &std::path::Path| {
            tempfile::Builder::new()
                .prefix("qgenome-bench-e2e-")
                .tempdir_in(parent)
                .with_context(|| format!("creating a scratch directory in {}", parent.display()))
        };
        let deploy_scratch = self.deploy_scratch.insert(scratch(&self.deploy_parent)?);
        let keys_apart = room(&self.key_parent)?.dev != room(&self.deploy_parent)?.dev;
        let deploy_bytes = self.needs.volumes + if keys_apart { 0 } else { self.keys_here };
        self.huge.extend(crate::keys::tmpfs::HugeTmpfs::over_tmpfs(
            deploy_scratch.path(),
            deploy_bytes + (256 << 20),
        ));
        // qgenome-mountd takes any volume path under /dev for a block device (and then wants
        // --state), so a scratch directory under /dev/shm is reached through a symlink.
        let mut deploy_dir = deploy_scratch.path().to_path_buf();
        if deploy_dir.starts_with("/dev") {
            let holder = tempfile::Builder::new()
                .prefix("qgenome-bench-e2e-link-")
                .tempdir()
                .context("creating a directory for a symlink to the deployment")?;
            let link = holder.path().join("deploy");
            std::os::unix::fs::symlink(&deploy_dir, &link).with_context(|| {
                format!("linking {} to {}", link.display(), deploy_dir.display())
            })?;
            self._alias = Some(holder);
            deploy_dir = link;
        }
        let key_ends = if keys_apart {
            let ks = self.key_scratch.insert(scratch(&self.key_parent)?);
            self.huge.extend(crate::keys::tmpfs::HugeTmpfs::over_tmpfs(
                ks.path(),
                self.keys_here + (64 << 20),
            ));
            link_key_dirs(&deploy_dir, ks.path(), args.n)?
        } else {
            Vec::new()
        };
        let (volume_size, pools) = e2e_sizes(args.size, args.chunk, args.k, args.n);
        let mut opts = crate::deploy::DeployOptions::new(&deploy_dir);
        opts.k = args.k;
        opts.n = args.n;
        opts.volume_size = volume_size;
        opts.key_size = pools.a_to_b;
        opts.reply_key_size = Some(pools.b_to_a);
        opts.chunk_size = args.chunk.to_string();
        opts.consent_wait_secs = 60;
        if let Some(parent) = &self.b2a_parent {
            opts.b2a_key_dir = Some(self.b2a_scratch.insert(scratch(parent)?).path().into());
        }
        let deployment = self.deployment.insert(
            crate::deploy::Deployment::start_sites(opts)
                .context("starting the sites (qgenome-mountd format and serve)")?,
        );
        for end in &key_ends {
            let pools = std::fs::read_dir(end)
                .with_context(|| format!("listing {}", end.display()))?
                .count();
            if pools == 0 {
                bail!(
                    "no key pools under {}: the deployment's key directory layout changed",
                    end.display()
                );
            }
        }
        deployment.mount()
    }

    /// Move the restore direction's pools from the disk to `--dir`, a tmpfs of huge pages
    /// like every other pool in RAM (`Deployment::relocate_pools`). Neither timed nor part of
    /// the store or the restore.
    fn reply_pools_to_ram(&mut self, args: &E2eArgs) -> anyhow::Result<()> {
        let ram = tempfile::Builder::new()
            .prefix("qgenome-bench-e2e-b2a-")
            .tempdir_in(&args.dir)
            .with_context(|| format!("creating a scratch directory in {}", args.dir.display()))?;
        let ram = self.b2a_ram.insert(ram).path().to_path_buf();
        self.huge.extend(crate::keys::tmpfs::HugeTmpfs::over_tmpfs(
            &ram,
            self.needs.reply_keys + (64 << 20),
        ));
        let d = self.deployment.as_mut().context("started")?;
        d.relocate_pools(crate::keys::Direction::BtoA, &ram)
    }

    /// Stop everything and delete the volumes and pools.
    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(mut d) = self.deployment.take() {
            d.stop_mount(false)?;
        }
        self.huge.clear();
        for dir in [
            self.key_scratch.take(),
            self.b2a_scratch.take(),
            self.b2a_ram.take(),
            self.deploy_scratch.take(),
        ]
        .into_iter()
        .flatten()
        {
            let path = dir.path().to_path_buf();
            dir.close()
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Store the source through the mount (timed dd) and restore it under consent (a timed read
/// that hashes what it gets); between the two, move the restore direction's pools to RAM when
/// the placement says so.
fn e2e_measure(
    args: &E2eArgs,
    placement: &mut Placement,
    source: &std::path::Path,
    source_hash: u128,
    cold: bool,
) -> anyhow::Result<E2eRun> {
    let deployment = placement.deployment.as_ref().context("started")?;
    let pdir = deployment.mountpoint.join(E2E_PATIENT);
    std::fs::create_dir(&pdir).with_context(|| format!("mkdir {}", pdir.display()))?;
    let target = pdir.join("bench.bin");
    let store = timed_dd(source, &target, args.bs).context("storing through the mount")?;
    let stored = std::fs::metadata(&target)
        .with_context(|| format!("stat {}", target.display()))?
        .len();
    if stored != args.size {
        bail!(
            "{} is {stored} bytes after the write, expected {}",
            target.display(),
            args.size
        );
    }
    if placement.reply_to_ram {
        placement
            .reply_pools_to_ram(args)
            .context("moving the restore direction's key pools to RAM")?;
    }
    let deployment = placement.deployment.as_ref().context("started")?;
    deployment
        .control(&json!({"cmd": "consent-grant", "patient": E2E_PATIENT, "minutes": 60}))
        .context("granting consent over the control socket")?;
    drop_caches_if(cold);
    let (restore, got) = timed_read(&target, args.bs).context("restoring through the mount")?;
    let status = deployment.control(&json!({"cmd": "status"}))?;
    if got != source_hash {
        bail!(
            "the restored file's XXH3-128 {got:032x} differs from the source's {source_hash:032x}: the pipeline is broken"
        );
    }
    Ok(E2eRun {
        store,
        restore,
        status,
    })
}

fn drop_caches_if(cold: bool) {
    if cold {
        drop_caches();
    }
}

fn e2e_gocryptfs(
    args: &E2eArgs,
    data_dir: &std::path::Path,
    source: &std::path::Path,
    source_hash: u128,
    cold: bool,
) -> anyhow::Result<BaselineRun> {
    let cipher = data_dir.join("gocryptfs-cipher");
    let plain = data_dir.join("gocryptfs-plain");
    for d in [&cipher, &plain] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    run_tool(
        Command::new("gocryptfs")
            .args(["-init", "-quiet", "-extpass", "echo pass"])
            .arg(&cipher),
    )
    .context("gocryptfs -init (Debian package gocryptfs; `make deps` installs it)")?;
    run_tool(
        Command::new("gocryptfs")
            .args(["-quiet", "-extpass", "echo pass"])
            .arg(&cipher)
            .arg(&plain),
    )
    .context("mounting gocryptfs")?;
    let mut mount = FuseMount(Some(plain.clone()));
    let target = plain.join("bench.bin");
    let write = timed_dd(source, &target, args.bs).context("writing through gocryptfs")?;
    drop_caches_if(cold);
    let (read, got) = timed_read(&target, args.bs).context("reading through gocryptfs")?;
    if got != source_hash {
        bail!("gocryptfs returned XXH3-128 {got:032x}, the source's is {source_hash:032x}");
    }
    std::fs::remove_file(&target).with_context(|| format!("removing {}", target.display()))?;
    mount.unmount()?;
    Ok(BaselineRun { write, read })
}

/// Bytes per stage of the ceiling measured beside `bench e2e`.
const CEILING_BYTES: u64 = 256 << 20;

fn bench_e2e(args: &E2eArgs) -> anyhow::Result<()> {
    if args.size == 0 || args.chunk == 0 || args.bs == 0 {
        bail!("--size, --chunk and --bs must be greater than zero");
    }
    // As the mount's config takes them (scheme and chunk_size), before anything is made.
    if !(2..=16).contains(&args.n) || !(2..=args.n).contains(&args.k) {
        bail!(
            "--k and --n: need 2 <= k <= n <= 16 (got k={} n={})",
            args.k,
            args.n
        );
    }
    if !(4 << 10..=16 << 20).contains(&args.chunk) {
        bail!("--chunk must be between 4K and 16M, as the mount's chunk_size");
    }
    let mut tools = vec!["dd", "fusermount3"];
    if !args.no_baseline {
        tools.push("gocryptfs");
    }
    for tool in tools {
        let found = Command::new("which")
            .arg(tool)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("{tool} is not installed (`make deps` installs what the benchmarks need)");
        }
    }
    let load_before = load_average();
    // What the required work alone allows on this machine, measured now, beside the run.
    // A ceiling that cannot be measured (no room for its pools on --dir, say) is said, and
    // the run goes on without it.
    let mut ceiling_note = None;
    let ceiling = if args.no_ceiling {
        None
    } else {
        super::ceiling::measure(CEILING_BYTES, args.k, args.n, args.chunk, 3, &args.dir)
            .map_err(|e| ceiling_note = Some(format!("no ceiling: {e:#}")))
            .ok()
    };
    let needs = e2e_needs(args.size, args.chunk, args.k, args.n);
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut notes: Vec<String> = ceiling_note.into_iter().collect();
    let data_room = room(&args.dir)?;
    let data_tmpfs = data_room.tmpfs;
    let mem = if args.key_dir.is_none() {
        settled_mem_available(data_room, needs, &mut notes)?
    } else {
        mem_available()?
    };
    let scratch = tempfile::Builder::new()
        .prefix("qgenome-bench-e2e-src-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a scratch directory in {}", args.dir.display()))?;
    let source = scratch.path().join("source.bin");
    let mut source_hash = None;
    // First the volumes on --dir (the key pools too when they fit); if that fails (too
    // small, or a filesystem qgenome-mountd cannot use), the volumes go to disk.
    let attempts: &[bool] = if data_tmpfs { &[true, false] } else { &[true] };
    let mut placement = None;
    for (i, &volumes_on_data) in attempts.iter().enumerate() {
        let last = i + 1 == attempts.len();
        let mut p = match Placement::plan(args, needs, volumes_on_data, mem) {
            Ok(p) => p,
            Err(e) if !last => {
                notes.push(format!("volumes not on {}: {e:#}", args.dir.display()));
                continue;
            }
            Err(e) => return Err(e),
        };
        if source_hash.is_none() {
            write_random(&source, args.size)?;
            source_hash = Some(read_hashed(&source, args.bs)?);
        }
        match p.start(args) {
            Ok(()) => {
                placement = Some(p);
                break;
            }
            Err(e) if !last => {
                notes.push(format!(
                    "the deployment cannot run on {}: {e:#}",
                    p.deploy_parent.display()
                ));
                p.finish()?;
            }
            Err(e) => return Err(e),
        }
    }
    let mut placement = placement.context("no placement was tried")?;
    let source_hash = source_hash.context("source written")?;
    // Where the pools went decides much of the result (pads read from disk or from RAM),
    // and depends on the memory available at the start: say so when they left --dir.
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let pools_moved = match placement.split {
        Some(KeySplit::StoreOnData) => Some("the restore direction's pools"),
        Some(KeySplit::AllOnDisk) => Some("every key pool"),
        _ => None,
    };
    if let Some(which) = pools_moved {
        notes.push(format!(
            "{which} on {DISK_FALLBACK}: {:.1} GiB of pools did not fit in {} beside the rest \
             ({:.1} GiB of memory available at the start, {} GiB kept free)",
            gib(needs.keys()),
            args.dir.display(),
            gib(mem),
            TMPFS_HEADROOM >> 30
        ));
    }
    if placement.reply_to_ram {
        notes.push(format!(
            "the restore direction's pools move to {} once the file is stored, before the \
             restore (untimed: the sites and the mount restart, so the counters are the \
             restore's alone)",
            args.dir.display()
        ));
    }
    let huge_pages = !placement.huge.is_empty();
    let where_ = |tmpfs: bool, huge: bool| match (tmpfs, huge) {
        (true, true) => "tmpfs, huge pages",
        (true, false) => "tmpfs",
        _ => "disk",
    };
    if !args.json {
        println!(
            "qgenome bench e2e: {} MiB, ({},{}) scheme, {} KiB chunks, dd bs={}; load average {load_before}",
            args.size >> 20,
            args.k,
            args.n,
            args.chunk >> 10,
            args.bs
        );
        for note in &notes {
            println!("  note: {note}");
        }
        println!(
            "  source: {} ({}); volumes and catalog: {} ({}); key pools: {} ({})",
            args.dir.display(),
            where_(data_tmpfs, false),
            placement.deploy_parent.display(),
            where_(placement.deploy_tmpfs, huge_pages),
            placement.key_parent.display(),
            where_(placement.key_tmpfs, huge_pages),
        );
    }
    let cold = drop_caches();
    if !cold {
        eprintln!("warning: cannot write /proc/sys/vm/drop_caches (not root): reads are not cold");
    }
    let run = e2e_measure(args, &mut placement, &source, source_hash, cold);
    // Stop the sites and free the volumes and pools (also after a failure) before the
    // baseline runs.
    let finished = placement.finish();
    let run = run?;
    finished?;
    let baseline = if args.no_baseline {
        None
    } else {
        Some(e2e_gocryptfs(
            args,
            scratch.path(),
            &source,
            source_hash,
            cold,
        )?)
    };
    let load_after = load_average();
    let store_mbps = run.store.mbps(args.size);
    let restore_mbps = run.restore.mbps(args.size);
    let key_left: Vec<serde_json::Value> = run.status["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let left = s["key_remaining"].as_u64()?;
            let reply = s["reply_key_remaining"].as_u64()?;
            Some(json!({"site": s["name"], "key_remaining": left, "reply_key_remaining": reply}))
        })
        .collect();
    if args.json {
        let mut v = json!({
            "size": args.size, "chunk": args.chunk, "bs": args.bs, "k": args.k, "n": args.n,
            "store_mbps": round1(store_mbps), "restore_mbps": round1(restore_mbps),
            "store_secs": run.store.wall.as_secs_f64(), "restore_secs": run.restore.wall.as_secs_f64(),
            "store_cpu_mbps": round1(run.store.cpu_mbps(args.size)),
            "restore_cpu_mbps": round1(run.restore.cpu_mbps(args.size)),
            "source_dir": args.dir, "source_tmpfs": data_tmpfs,
            "volume_dir": placement.deploy_parent, "volume_tmpfs": placement.deploy_tmpfs,
            "key_dir": placement.key_parent, "key_tmpfs": placement.key_tmpfs,
            "b2a_key_dir": placement.b2a_parent,
            "reply_pools_to_ram": placement.reply_to_ram,
            "tmpfs_huge_pages": huge_pages,
            "notes": notes, "cold_reads": cold,
            "load_before": load_before, "load_after": load_after,
            "stats": run.status["stats"], "key_left": key_left,
        });
        if let Some(b) = &baseline {
            let (w, r) = (b.write.mbps(args.size), b.read.mbps(args.size));
            v["gocryptfs_write_mbps"] = json!(round1(w));
            v["gocryptfs_read_mbps"] = json!(round1(r));
            v["gocryptfs_write_cpu_mbps"] = json!(round1(b.write.cpu_mbps(args.size)));
            v["gocryptfs_read_cpu_mbps"] = json!(round1(b.read.cpu_mbps(args.size)));
            v["store_vs_gocryptfs"] = json!(round1(store_mbps / w * 100.0) / 100.0);
            v["restore_vs_gocryptfs"] = json!(round1(restore_mbps / r * 100.0) / 100.0);
        }
        if let Some(c) = &ceiling {
            let (sc, rc) = (c.mbps(true), c.mbps(false));
            v["store_ceiling_mbps"] = json!(round1(sc));
            v["restore_ceiling_mbps"] = json!(round1(rc));
            v["store_vs_ceiling"] = json!(round2(store_mbps / sc));
            v["restore_vs_ceiling"] = json!(round2(restore_mbps / rc));
            v["ceiling"] = c.json();
        }
        println!("{v}");
    } else {
        println!(
            "store   {store_mbps:>8.1} MB/s  ({:.2} s, dd through the mount, including the committing close; {:.1} MB per busy CPU-second)",
            run.store.wall.as_secs_f64(),
            run.store.cpu_mbps(args.size)
        );
        println!(
            "restore {restore_mbps:>8.1} MB/s  ({:.2} s, read bs={} under consent{}, hashed as read: matches the source; {:.1} MB per busy CPU-second)",
            run.restore.wall.as_secs_f64(),
            args.bs,
            if cold { ", caches dropped first" } else { "" },
            run.restore.cpu_mbps(args.size)
        );
        if let Some(b) = &baseline {
            let (w, r) = (b.write.mbps(args.size), b.read.mbps(args.size));
            println!(
                "gocryptfs write {w:>8.1} MB/s, read {r:>8.1} MB/s (same source, same dd write and hashed read) -> store {:.2}x, restore {:.2}x",
                store_mbps / w,
                restore_mbps / r
            );
        }
        if let Some(c) = &ceiling {
            let (sc, rc) = (c.mbps(true), c.mbps(false));
            println!(
                "ceiling store {sc:>8.1} MB/s, restore {rc:>8.1} MB/s (`qgenome bench ceiling`: the required work alone on every core) -> store {:.2}x, restore {:.2}x",
                store_mbps / sc,
                restore_mbps / rc
            );
        }
        println!("counters: {}", run.status["stats"]);
        println!("load average after: {load_after}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 70 4 6 900 0 0\ncpu0 50 1 15 2500 35 2 3 450 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 2 + 30 + 4 + 6));
        assert_eq!(parse_busy_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 x 3 4 5 6 7\n"), None);
    }

    #[test]
    fn e2e_sizes_leave_room_for_every_share_and_pad() {
        for (size, chunk) in [
            (1u64 << 20, 1u64 << 20),
            (2 << 30, 1 << 20),
            (5 << 20, 4096),
        ] {
            for (k, n) in [(2, 3), (3, 5), (2, 2), (1, 4)] {
                let (volume, pools) = e2e_sizes(size, chunk, k, n);
                let chunks = size.div_ceil(chunk);
                // Every share in whole 4 KiB blocks plus a header block, and every frame's pad.
                assert!(volume >= size + chunks * 8192, "volume {volume} for {size}");
                assert!(pools.a_to_b >= size + chunks * 64, "{pools:?} for {size}");
                // The reply direction carries (k-1)/(n-1) of the shares a read fetches.
                let read = size * (k as u64 - 1) / (n as u64 - 1);
                assert!(pools.b_to_a >= read + chunks * 64, "{pools:?} ({k},{n})");
                assert!(pools.b_to_a <= pools.a_to_b, "{pools:?} ({k},{n})");
                assert_eq!(volume % (1 << 20), 0);
            }
        }
        let (_, pools) = e2e_sizes(2 << 30, 1 << 20, 2, 3);
        assert!(pools.b_to_a < pools.a_to_b * 6 / 10, "{pools:?}");
    }

    #[test]
    fn needs_count_two_pools_per_link_direction_and_every_volume() {
        let needs = e2e_needs(1 << 30, 1 << 20, 2, 3);
        let (volume, pools) = e2e_sizes(1 << 30, 1 << 20, 2, 3);
        let h = crate::keys::pool::HEADER_LEN;
        assert_eq!(needs.source, 1 << 30);
        assert!(needs.volumes >= 3 * volume);
        assert_eq!(needs.store_keys, 2 * 2 * (pools.a_to_b + h));
        assert_eq!(needs.reply_keys, 2 * 2 * (pools.b_to_a + h));
        assert_eq!(needs.keys(), needs.store_keys + needs.reply_keys);
        // A store spends at least a share's length of pad per chunk at both ends of each link.
        assert_eq!(
            needs.store_keys_after_store,
            needs.store_keys - 2 * 2 * (1 << 30)
        );
        assert!(needs.store_keys_after_store < needs.store_keys / 10);
    }

    #[test]
    fn tmpfs_room_is_capped_by_memory_less_headroom() {
        let shm = Room {
            dev: 1,
            free: 24 << 30,
            tmpfs: true,
        };
        let disk = Room {
            dev: 2,
            free: 38 << 30,
            tmpfs: false,
        };
        assert_eq!(shm.usable(18 << 30), 15 << 30);
        assert_eq!(shm.usable(2 << 30), 0);
        assert_eq!(disk.usable(1 << 30), 38 << 30);
        let p = std::path::Path::new;
        let mem = 18 << 30;
        // 2 GiB: the source fits in memory, the ~13 GiB of pools do not.
        let n2 = e2e_needs(2 << 30, 1 << 20, 2, 3);
        assert!(!keys_fit_with_data(shm, n2, false, mem));
        assert!(check_room(
            &[
                (p("/dev/shm"), shm, n2.source, "the source"),
                (p("/var/tmp"), disk, n2.volumes, "the volumes"),
                (p("/var/tmp"), disk, n2.keys(), "the key pools"),
            ],
            mem
        )
        .is_ok());
        let err = check_room(
            &[
                (p("/dev/shm"), shm, n2.source, "the source"),
                (p("/dev/shm"), shm, n2.keys(), "the key pools"),
            ],
            mem,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/dev/shm") && err.contains("key pools"),
            "{err}"
        );
        // 2 GiB with the volumes in memory: with 23 GiB available the store direction's pools
        // fit beside them (the restore direction's go to disk, and fit in RAM once the store
        // has destroyed its pads); with 18, none; with plenty, all.
        let avail = 23 << 30;
        assert_eq!(key_split(shm, n2, true, avail), KeySplit::StoreOnData);
        // As on this VM one night (session 27), 21.2 GiB available: the store direction's
        // pools still go to RAM (with 4 GiB kept free they went to disk).
        let night = (212 << 30) / 10;
        assert_eq!(key_split(shm, n2, true, night), KeySplit::StoreOnData);
        assert!(reply_keys_fit_after_store(shm, n2, true, night));
        assert!(reply_keys_fit_after_store(shm, n2, true, avail));
        let before_store = n2.source + n2.volumes + n2.store_keys;
        let after_store = n2.source + n2.volumes + n2.store_keys_after_store + n2.reply_keys;
        assert!(after_store < before_store, "{after_store} {before_store}");
        assert_eq!(key_split(shm, n2, true, mem), KeySplit::AllOnDisk);
        let big = Room {
            free: 64 << 30,
            ..shm
        };
        assert_eq!(key_split(big, n2, true, 64 << 30), KeySplit::AllOnData);
        // Only a tmpfs is worth moving the pools to.
        let small_disk = Room {
            free: 20 << 30,
            ..disk
        };
        assert_eq!(key_split(small_disk, n2, true, mem), KeySplit::StoreOnData);
        assert!(!reply_keys_fit_after_store(small_disk, n2, true, mem));
        // 1 GiB: source and pools fit in memory beside each other when the volumes are on disk.
        let n1 = e2e_needs(1 << 30, 1 << 20, 2, 3);
        assert!(keys_fit_with_data(shm, n1, false, mem));
        assert!(!keys_fit_with_data(shm, n1, true, 12 << 30));
        // Two tmpfs mounts draw on the same memory.
        let shm2 = Room { dev: 3, ..shm };
        let err = check_room(
            &[
                (p("/dev/shm"), shm, 9 << 30, "the source"),
                (p("/run/x"), shm2, 9 << 30, "the key pools"),
            ],
            mem,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory"), "{err}");
        let tiny = Room {
            free: 1 << 30,
            ..disk
        };
        let err = check_room(&[(p("/var/tmp"), tiny, n2.keys(), "the key pools")], mem)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/var/tmp") && err.contains("key pools"),
            "{err}"
        );
    }

    /// The wait for memory: none when there is enough; on while it rises, up to its limit;
    /// over once it stops rising; each wait noted, and one that ends short says so.
    #[test]
    fn the_wait_for_memory_ends_when_enough_or_no_longer_rising() {
        const G: u64 = 1 << 30;
        let run = |samples: Vec<u64>| {
            let mut it = samples.into_iter();
            let mut last = 0;
            let mut slept = Duration::ZERO;
            let mut notes = Vec::new();
            let mem = settle(
                |m| m >= 22 * G,
                || {
                    last = it.next().unwrap_or(last);
                    Ok(last)
                },
                |d| slept += d,
                &mut notes,
            )
            .unwrap();
            (mem, slept.as_secs(), notes)
        };
        let (mem, slept, notes) = run(vec![23 * G]);
        assert_eq!((mem, slept), (23 * G, 0));
        assert!(notes.is_empty(), "{notes:?}");
        // Rising 64 MiB a step, enough after four steps.
        let (mem, slept, notes) = run((0..5).map(|i| 22 * G - (4 - i) * (64 << 20)).collect());
        assert_eq!((mem, slept), (22 * G, 8));
        assert!(notes[0].starts_with("waited 8 s") && !notes[0].contains("not enough"));
        // Flat: over after 10 s, and said to be short.
        let (mem, slept, notes) = run(vec![20 * G]);
        assert_eq!((mem, slept), (20 * G, 10));
        assert!(notes[0].contains("not enough"), "{notes:?}");
        // Rising slowly but for good, never enough: over at the limit.
        let (_, slept, _) = run((0..200).map(|i| 10 * G + i * (8 << 20)).collect());
        assert_eq!(slept, MEM_SETTLE_MAX.as_secs());
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   18000000 kB\n";
        assert_eq!(
            parse_mem_field(text, "MemAvailable"),
            Some(18_000_000 * 1024)
        );
        assert_eq!(parse_mem_field(text, "MemTotal"), Some(24_000_000 * 1024));
        assert_eq!(parse_mem_field("MemTotal: 5 kB\n", "MemAvailable"), None);
        assert_eq!(parse_mem_field("MemTotalX: 5 kB\n", "MemTotal"), None);
    }

    #[test]
    fn key_directories_are_linked_where_the_deployment_looks() {
        let d = tempfile::tempdir().unwrap();
        let (deploy, keys) = (d.path().join("deploy"), d.path().join("keys"));
        let ends = link_key_dirs(&deploy, &keys, 3).unwrap();
        assert_eq!(ends.len(), 3);
        std::fs::create_dir_all(deploy.join("keys").join("home-site1")).unwrap();
        std::fs::write(deploy.join("site2").join("keys").join("pool"), b"x").unwrap();
        assert!(keys.join("home").join("home-site1").is_dir());
        assert!(keys.join("site2").join("pool").is_file());
    }
}
