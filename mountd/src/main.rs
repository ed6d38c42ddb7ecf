//! `qgenome-mountd`: format, scrub, inspect and benchmark a site's share volume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qgenome_mountd::bench::{bench_store, pattern, run_key, FioBaseline, StoreBench, RUN_META};
use qgenome_mountd::config::parse_size;
use qgenome_mountd::store::{FormatOptions, Store, StoreError, StoreOptions};
use qgenome_mountd::volume::{
    create_file_volume, Durability, UringOptions, UringVolume, VolumeKind,
};

#[derive(Parser)]
#[command(
    name = "qgenome-mountd",
    version,
    about = "qgenome site daemon: share volumes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct VolumeArgs {
    /// The share volume: a block device or a (preallocated) file.
    #[arg(long)]
    volume: PathBuf,
    /// The index directory (default: VOLUME.state next to a file volume).
    #[arg(long)]
    state: Option<PathBuf>,
    /// How writes are made durable: rwf-dsync (each write flushed with it), fdatasync (one
    /// flush shared by the writes that completed before it) or o-dsync.
    #[arg(long, default_value = "rwf-dsync")]
    durability: Durability,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve shares on the configured Unix socket and sealed TCP links until SIGTERM.
    Serve {
        /// The site configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a fresh superblock; creates and preallocates a file volume when --size is given.
    Format {
        #[command(flatten)]
        vol: VolumeArgs,
        /// The site name recorded in the superblock.
        #[arg(long)]
        site: String,
        /// Size of a file volume to create (e.g. 10G) if it does not exist.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Allocation unit in bytes (default: the block size).
        #[arg(long, value_parser = parse_size)]
        alloc_unit: Option<u64>,
        /// With --size: write zeros over the new file volume (slower to create; no first-write
        /// cost per block afterwards: unwritten extents on ext4/XFS, lazily backed memory).
        #[arg(long, requires = "size")]
        zero: bool,
        /// Format a volume that holds shares (discarding every one of them), and discard an
        /// existing index in the state directory.
        #[arg(long)]
        force: bool,
    },
    /// Re-read and verify every stored share; non-zero exit if any is damaged.
    Scrub {
        #[command(flatten)]
        vol: VolumeArgs,
    },
    /// Print capacity, free space and share count as JSON.
    Stat {
        #[command(flatten)]
        vol: VolumeArgs,
    },
    /// Rebuild the index from the share headers on the volume (the old index is kept aside).
    RebuildIndex {
        #[command(flatten)]
        vol: VolumeArgs,
    },
    /// Measure store put/get of shares against fio on the same filesystem. Also reports where a
    /// put's time goes (`put_latency_us`, mean microseconds): the whole put, its transfer and
    /// opening on the link, the hand-off to the store's work, and the store, of which the wait
    /// for a place among the volume's writes (`write_queue`), the volume's write, and the wait
    /// for the flush that made it durable.
    Bench {
        #[command(flatten)]
        vol: VolumeArgs,
        /// Bytes to put and get (and for fio to write and read).
        #[arg(long, value_parser = parse_size, default_value = "2G")]
        size: u64,
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        share_size: u64,
        /// Puts and gets at the volume at once: fio's iodepth, the store's share writes at
        /// once (`limits.write_depth`), the threads of the store alone (`--direct`), and the
        /// threads that get through the daemon.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Through the daemon: client connections that put (a thread each, one request at a
        /// time), so that the next shares arrive while the store writes [default: 2 x jobs].
        #[arg(long)]
        connections: Option<usize>,
        /// Skip the fio baseline.
        #[arg(long)]
        no_fio: bool,
        /// Each phase is cut into this many slices, each measured right beside fio over the
        /// same bytes, alternating which goes first, so the disk's drift falls on both alike.
        #[arg(long, default_value_t = 4)]
        rounds: u64,
        /// Measure the store directly instead of through the server over sealed TCP.
        #[arg(long)]
        direct: bool,
        /// Where the bench's link key pools go (tmpfs, so the volume is what is measured).
        #[arg(long, default_value = "/dev/shm")]
        key_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Test load: put shares of file FILE, printing "ACK i" after each put returns.
    #[command(hide = true)]
    Stress {
        #[command(flatten)]
        vol: VolumeArgs,
        #[arg(long)]
        file: u8,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        share_size: u64,
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
}

impl VolumeArgs {
    fn state_dir(&self) -> Result<PathBuf> {
        if let Some(s) = &self.state {
            return Ok(s.clone());
        }
        // A block device, or any name under /dev but a file on /dev/shm (a tmpfs).
        let device = (self.volume.starts_with("/dev") && !self.volume.starts_with("/dev/shm"))
            || std::fs::metadata(&self.volume)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
        if device {
            bail!(
                "volume {} is a device: give the index directory with --state",
                self.volume.display()
            );
        }
        let mut s = self.volume.clone().into_os_string();
        s.push(".state");
        Ok(PathBuf::from(s))
    }

    fn open_volume(&self) -> Result<UringVolume> {
        let opts = UringOptions {
            durability: self.durability,
            ..UringOptions::default()
        };
        Ok(UringVolume::open(&self.volume, &opts)?)
    }

    fn open_store(&self) -> Result<Store<UringVolume>> {
        let dir = self.state_dir()?;
        Ok(Store::open(
            self.open_volume()?,
            &dir,
            StoreOptions::default(),
        )?)
    }
}

fn main() -> ExitCode {
    qgenome::tune_malloc();
    qgenome::cli::init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qgenome-mountd: {}", qgenome::error_line(&e));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve { config } => serve(&config)?,
        Cmd::Format {
            vol,
            site,
            size,
            alloc_unit,
            zero,
            force,
        } => {
            format(&vol, &site, size.map(|s| (s, zero)), alloc_unit, force)?;
        }
        Cmd::Scrub { vol } => {
            let store = vol.open_store()?;
            let r = store.scrub()?;
            for d in &r.damaged {
                println!("DAMAGED {} at offset {}: {}", d.key, d.offset, d.reason);
            }
            println!(
                "scrubbed {} shares ({} bytes): {} damaged",
                r.checked,
                r.bytes,
                r.damaged.len()
            );
            if !r.damaged.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Stat { vol } => {
            let store = vol.open_store()?;
            println!("{}", serde_json::to_string_pretty(&store.stat())?);
        }
        Cmd::RebuildIndex { vol } => {
            let dir = vol.state_dir()?;
            let r = Store::rebuild_index(&vol.open_volume()?, &dir)?;
            println!(
                "rebuilt index {}: {} shares, {} superseded (older generations, and shares the old index was retiring: not indexed, their headers zeroed when the daemon next starts), {} torn, {} bytes scanned{}",
                dir.display(),
                r.shares,
                r.superseded,
                r.torn,
                r.scanned_bytes,
                r.old_index
                    .map(|p| format!(", old index kept at {}", p.display()))
                    .unwrap_or_default()
            );
        }
        Cmd::Bench {
            vol,
            size,
            share_size,
            jobs,
            connections,
            no_fio,
            rounds,
            direct,
            key_dir,
            json,
        } => {
            let via = (!direct).then_some(key_dir.as_path());
            if direct && connections.is_some() {
                bail!("--connections is for the bench through the daemon, not with --direct");
            }
            let run = BenchRun {
                size,
                share_size,
                jobs: jobs.max(1),
                connections: connections.unwrap_or(2 * jobs).max(1),
                rounds,
                no_fio,
            };
            bench(&vol, &run, via, json)?;
        }
        Cmd::Stress {
            vol,
            file,
            seed,
            count,
            share_size,
            jobs,
        } => {
            stress(&vol, file, seed, count, share_size as usize, jobs.max(1))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn format(
    vol: &VolumeArgs,
    site: &str,
    size: Option<(u64, bool)>,
    au: Option<u64>,
    force: bool,
) -> Result<()> {
    if size.is_some_and(|(size, _)| size == 0) {
        bail!("--size must be greater than zero");
    }
    let dir = vol.state_dir()?;
    // What this format made it removes again if it fails, and nothing else: a retry starts
    // from the same place.
    let mut made = Made::default();
    let r = format_volume(vol, &dir, site, size, au, force, &mut made);
    if r.is_err() {
        if made.volume {
            let _ = std::fs::remove_file(&vol.volume);
        }
        if made.dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    r
}

/// What a `format` created itself (set only once the creating call succeeded).
#[derive(Default)]
struct Made {
    volume: bool,
    dir: bool,
}

/// How much of a volume's start `format` reads to tell a blank volume from one holding data.
const BLANK_CHECK: usize = 1 << 20;

/// The offset of the first byte that is not zero in the [`BLANK_CHECK`] bytes of the volume
/// from `from` on.
fn first_nonzero(volume: &Path, from: u64) -> Result<Option<u64>> {
    use std::io::{Read, Seek};
    let mut head = Vec::with_capacity(BLANK_CHECK);
    std::fs::File::open(volume)
        .and_then(|mut f| {
            f.seek(std::io::SeekFrom::Start(from))?;
            f.take(BLANK_CHECK as u64).read_to_end(&mut head)
        })
        .with_context(|| format!("volume {}: reading it from byte {from}", volume.display()))?;
    Ok(head.iter().position(|&b| b != 0).map(|at| from + at as u64))
}

fn format_volume(
    vol: &VolumeArgs,
    dir: &Path,
    site: &str,
    size: Option<(u64, bool)>,
    au: Option<u64>,
    force: bool,
    made: &mut Made,
) -> Result<()> {
    if !vol.volume.exists() {
        let Some((size, zeroed)) = size else {
            bail!(
                "volume {} does not exist; give --size to create a file volume",
                vol.volume.display()
            );
        };
        // Refuses to create over anything there, a dangling symlink included.
        create_file_volume(&vol.volume, size, zeroed)?;
        made.volume = true;
    } else if let Some((size, _)) = size {
        let meta = std::fs::metadata(&vol.volume)
            .with_context(|| format!("volume {}", vol.volume.display()))?;
        if meta.is_file() && meta.len() != size {
            bail!(
                "volume {} exists with {} bytes: --size {size} only creates a new file volume (remove --size, or the file)",
                vol.volume.display(),
                meta.len()
            );
        }
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => made.dir = true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => {
            return Err(e).with_context(|| format!("creating state directory {}", dir.display()))
        }
    }
    // Not under a daemon (or a rebuild) using this index; released before the open below,
    // which takes it again.
    let lock = qgenome_mountd::store::lock_state_dir(dir)?;
    let index = dir.join("index");
    if index.exists() && !force {
        bail!(
            "index {} exists; pass --force to discard it (only the index of this volume is)",
            index.display()
        );
    }
    // `--force` discards a share index, not whatever a mistyped --state holds.
    if index.exists() && !index.join("db").is_file() {
        bail!(
            "{} is not a share index (no sled database in it): check --state; it is left as it is",
            index.display()
        );
    }
    let dev = vol.open_volume()?;
    let opts = FormatOptions {
        alloc_unit: au
            .map(u32::try_from)
            .transpose()
            .context("--alloc-unit too large")?,
    };
    // Everything is checked before the old index goes (and a volume too small to hold
    // anything is said as such, not as an unreadable superblock).
    Store::check_format(&dev, site, &opts)?;
    // A volume shares were written to (whatever index serves it, from whatever state
    // directory) is formatted only on purpose: a new volume id makes every share unreadable.
    // So is one holding anything else: a mistyped device or file name must not cost its data.
    if !force {
        match qgenome_mountd::store::read_superblock(&dev) {
            Ok(sb) if sb.index_tag != 0 => bail!(
                "volume {} holds shares of site {} (written since its format); formatting discards every one of them: pass --force to do so",
                vol.volume.display(),
                sb.site
            ),
            // No share written since this build's format, but a volume of a build before
            // index tags (whose shares the store tags at its first open) may hold some.
            Ok(sb) => {
                if let Some(at) = first_nonzero(&vol.volume, sb.data_start)? {
                    bail!(
                        "volume {} of site {} is not blank past its superblock (byte {at} is not zero): it may hold shares written before index tags; formatting discards them: pass --force to do so",
                        vol.volume.display(),
                        sb.site
                    );
                }
            }
            Err(StoreError::NoSuperblock { .. }) => {
                if let Some(at) = first_nonzero(&vol.volume, 0)? {
                    bail!(
                        "volume {} is not blank (byte {at} is not zero) and holds no qgenome superblock: formatting would overwrite what it holds; pass --force to do so",
                        vol.volume.display()
                    );
                }
            }
            // A superblock that cannot be read or checked may still front shares.
            Err(e) => bail!("{e}; formatting would discard whatever the volume holds: pass --force to do so"),
        }
    }
    if index.exists() {
        // `--force` discards this volume's own index, not another's (a mistyped --state would
        // have left that site refusing to start until its whole volume was scanned again).
        if let Some(named) = qgenome_mountd::store::index_volume_id(&index) {
            let this = qgenome_mountd::store::read_superblock(&dev)
                .ok()
                .map(|sb| sb.volume_id);
            if this.as_ref().is_none_or(|id| id[..] != named[..]) {
                bail!(
                    "index {} belongs to volume {}, not to {} ({}): check --state; if that volume is gone for good, remove the index by hand",
                    index.display(),
                    qgenome::link::hex(&named),
                    vol.volume.display(),
                    this.map_or("which has no superblock yet".to_string(), |id| format!(
                        "volume {}",
                        qgenome::link::hex(&id)
                    ))
                );
            }
        }
        std::fs::remove_dir_all(&index)
            .with_context(|| format!("removing index {}", index.display()))?;
    }
    let sb = Store::format(&dev, site, &opts)?;
    drop(lock);
    drop(Store::open(dev, dir, StoreOptions::default())?);
    println!(
        "formatted {} for site {}: {} bytes, block {} unit {}, index {}",
        vol.volume.display(),
        sb.site,
        sb.volume_len,
        sb.block_size,
        sb.alloc_unit,
        dir.display()
    );
    Ok(())
}

fn serve(path: &Path) -> Result<()> {
    use qgenome_mountd::config::SiteConfig;
    use qgenome_mountd::server::{LinkEnds, Listeners, Server, ServerLimits};
    let cfg = SiteConfig::load(path)?;
    if cfg.listen.is_none() && cfg.unix_socket.is_none() {
        bail!(
            "config {}: keys `listen` and `unix_socket`: neither is set, so the daemon would serve nobody",
            path.display()
        );
    }
    qgenome::harden::harden_process("qgenome-mountd")?;
    let dev = UringVolume::open(&cfg.volume, &cfg.uring_options())?;
    // Two sites' configs or volumes swapped would serve one site's shares as another's.
    let formatted_for = qgenome_mountd::store::read_superblock(&dev)?.site;
    if formatted_for != cfg.site {
        bail!(
            "config {}: key `site`: {:?}, but volume {} was formatted for site {formatted_for:?} (another site's config or volume?)",
            path.display(),
            cfg.site,
            cfg.volume.display()
        );
    }
    let store = Store::open(dev, &cfg.state_dir, cfg.store_options())?;
    let links = cfg
        .links
        .iter()
        .map(LinkEnds::open)
        .collect::<Result<Vec<_>, _>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Every connection (up to `max_connections` per listener, Unix and TCP) may have one
        // request's blocking work under way, on its own thread (`block_in_place`, which hands
        // the worker's other tasks to a thread of this pool), with room to spare.
        .max_blocking_threads(2 * cfg.limits.max_connections as usize + 8)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let listeners = Listeners::bind(&cfg).await?;
        if let Some((_, p)) = &listeners.unix {
            tracing::info!("site {}: listening on unix {}", cfg.site, p.display());
        }
        if let Some(t) = &listeners.tcp {
            tracing::info!("site {}: listening on tcp {}", cfg.site, t.local_addr()?);
        }
        for l in &links {
            tracing::info!(
                "link {}: {} key bytes left to send, {} to receive",
                l.name,
                l.send_remaining(),
                l.recv_remaining()
            );
        }
        let server =
            std::sync::Arc::new(Server::new(store, links, ServerLimits::from_config(&cfg)));
        // The handlers exist before READY=1 goes out: a future's body runs only when first
        // polled, and a SIGTERM between READY and that poll (a restart racing the start)
        // would have killed the daemon without finishing its connections.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            let _ = qgenome::notify::notify("STOPPING=1");
        };
        if let Err(e) = qgenome::notify::notify("READY=1") {
            tracing::warn!("sd_notify READY=1: {e}");
        }
        tracing::info!("site {}: ready", cfg.site);
        server.run(listeners, shutdown).await?;
        anyhow::Ok(())
    })
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What `qgenome-mountd bench` moves, and how.
struct BenchRun {
    size: u64,
    share_size: u64,
    jobs: usize,
    connections: usize,
    rounds: u64,
    no_fio: bool,
}

fn bench(vol: &VolumeArgs, run: &BenchRun, via_daemon: Option<&Path>, json: bool) -> Result<()> {
    let &BenchRun {
        size,
        share_size,
        jobs,
        connections,
        rounds,
        no_fio,
    } = run;
    if share_size == 0 {
        bail!("--share-size must be at least 1 byte");
    }
    let count = size / share_size;
    if count == 0 {
        bail!("--size must be at least one share");
    }
    // Whatever this bench creates (a volume and its index when none was given, fio's file)
    // it removes, whether the measurement succeeds or not.
    let created = !vol.volume.exists();
    let state = vol.state_dir()?;
    if created && state.exists() {
        bail!(
            "--state {} exists, but volume {} does not: a new bench volume takes a new index directory, which the bench removes after (remove it, or give another --state)",
            state.display(),
            vol.volume.display()
        );
    }
    let fio_path = sibling(&vol.volume, ".fio");
    if !no_fio && fio_path.exists() {
        bail!(
            "{} exists: the bench makes fio's file there and removes it after (remove it, or give the volume another name)",
            fio_path.display()
        );
    }
    let mut made_fio = false;
    let measured = (|| -> Result<(StoreBench, bool, Durability)> {
        if created {
            // Room for the shares, their header blocks and the superblock.
            let need = count * (share_size + 64 * 1024) + (64 << 20);
            create_file_volume(&vol.volume, need, true)?;
            let dev = vol.open_volume()?;
            Store::format(&dev, "bench", &FormatOptions::default())?;
        }
        let store = Store::open(
            vol.open_volume()?,
            &state,
            StoreOptions {
                max_share_len: share_size.max(1 << 20),
                // The volume gets the shares fio's iodepth gives it.
                write_depth: jobs,
                ..StoreOptions::default()
            },
        )?;
        let fixed = store.device().has_fixed_buffers();
        // The mode the volume uses (on tmpfs, RWF_DSYNC whatever was asked).
        let durability = store.device().durability();
        // fio's file is made as the volume is (allocated and written with zeros), and each
        // round of fio writes and reads its own slice of it, as that round's shares take theirs.
        if !no_fio && store.device().kind() != VolumeKind::BlockDevice {
            made_fio = true;
            create_file_volume(&fio_path, count * share_size, true)?;
        }
        let fio = made_fio.then(|| FioBaseline {
            file: &fio_path,
            iodepth: jobs,
        });
        let share_len = share_size as usize;
        let r = match via_daemon {
            None => bench_store(&store, count, share_len, jobs, rounds, fio.as_ref())?,
            Some(keys) => qgenome_mountd::bench::bench_daemon(
                store,
                count,
                share_len,
                jobs,
                connections,
                rounds,
                fio.as_ref(),
                keys,
            )?,
        };
        Ok((r, fixed, durability))
    })();
    if made_fio {
        let _ = std::fs::remove_file(&fio_path);
    }
    if created {
        let _ = std::fs::remove_file(&vol.volume);
        let _ = std::fs::remove_dir_all(&state);
    }
    let (r, fixed, durability) = measured?;
    let mut out = serde_json::json!({
        "put_mbps": r.put_mbps,
        "get_mbps": r.get_mbps,
        "put_cpu_mbps": r.put_cpu_mbps,
        "get_cpu_mbps": r.get_cpu_mbps,
        "key_huge_pages": r.key_huge_pages,
        "shares": r.shares,
        "share_size": share_size,
        "jobs": jobs,
        "durability": durability,
        "fixed_buffers": fixed,
        "path": if via_daemon.is_some() { "daemon-tcp-sealed" } else { "store-direct" },
        "rounds": r.rounds,
        "put_latency_us": r.put_latency,
    });
    out["write_depth"] = jobs.into();
    if via_daemon.is_some() {
        out["connections"] = connections.into();
    }
    if let (Some(w), Some(rd)) = (r.fio_write_mbps, r.fio_read_mbps) {
        out["fio_write_mbps"] = w.into();
        out["fio_read_mbps"] = rd.into();
        out["fio_write_dsync_mbps"] = r.fio_write_dsync_mbps.into();
        out["put_vs_fio_write"] = (r.put_mbps / w).into();
        // A put is durable when acknowledged; fio's plain write is not.
        out["put_vs_fio_write_dsync"] = r.fio_write_dsync_mbps.map(|d| r.put_mbps / d).into();
        out["get_vs_fio_read"] = (r.get_mbps / rd).into();
    }
    if json {
        println!("{out}");
    } else {
        for (k, v) in out.as_object().expect("object") {
            println!("{k:>22}: {v}");
        }
    }
    Ok(())
}

fn stress(
    vol: &VolumeArgs,
    file: u8,
    seed: u64,
    count: u64,
    share_len: usize,
    jobs: usize,
) -> Result<()> {
    let store = vol.open_store()?;
    let mut file_id = [0u8; 16];
    file_id[0] = file;
    let next = AtomicU64::new(0);
    let out = Mutex::new(std::io::stdout());
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut data = vec![0u8; share_len];
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= count {
                            return Ok(());
                        }
                        let key = run_key(file_id, i);
                        pattern(seed, &key, &mut data);
                        store.put(key, RUN_META, &data)?;
                        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                        writeln!(o, "ACK {i}")?;
                        o.flush()?;
                    }
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("stress thread"))
    })
}
