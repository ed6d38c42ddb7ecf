//! Throughput measurement of the store, with fio as the baseline on the same filesystem, and
//! the deterministic share contents used by benchmarks and crash tests.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::layout::{ShareKey, ShareMeta};
use crate::server::LinkTimes;
use crate::store::{PutTimes, Store, StoreError};
use crate::volume::{add_nanos, BlockDevice};

/// Fills `out` with bytes determined by (seed, key): a child process can write them and its
/// parent check them without any channel between the two.
pub fn pattern(seed: u64, key: &ShareKey, out: &mut [u8]) {
    let mut x = seed ^ key.chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (u64::from(key.share) << 56);
    for b in key.file_id {
        x = x.rotate_left(8) ^ u64::from(b);
    }
    x |= 1;
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    for b in chunks.into_remainder() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// The key of share `i` of a benchmark or stress run on file `file_id`.
pub fn run_key(file_id: [u8; 16], i: u64) -> ShareKey {
    ShareKey {
        file_id,
        chunk: i,
        share: (i % 3) as u8,
    }
}

pub const RUN_META: ShareMeta = ShareMeta {
    k: 2,
    n: 3,
    secret_len: 1 << 20,
};

/// The two halves of a store benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Put,
    Get,
}

/// One round of a phase: a slice of the shares through the store, and fio over the same number
/// of bytes right beside it (after the slice in the first, third... round, before it in the
/// others), so that the disk's drift over minutes falls on both alike.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Round {
    pub phase: Phase,
    pub shares: u64,
    pub mbps: f64,
    pub cpu_mbps: f64,
    /// fio's write (put) or read (get) over the same bytes, MB/s.
    pub fio_mbps: Option<f64>,
    /// fio's write with `--sync=dsync` (put rounds only), MB/s.
    pub fio_dsync_mbps: Option<f64>,
}

/// Store throughput in MB/s (10^6 bytes of share data per second), over all rounds: bytes
/// moved divided by the time the rounds took, fio's likewise.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreBench {
    pub put_mbps: f64,
    pub get_mbps: f64,
    /// Bytes per CPU-second of this whole process (client, server, key destroyers, io_uring
    /// thread): what the put or get costs, which a shared machine's noise moves far less.
    pub put_cpu_mbps: f64,
    pub get_cpu_mbps: f64,
    pub fio_write_mbps: Option<f64>,
    pub fio_write_dsync_mbps: Option<f64>,
    pub fio_read_mbps: Option<f64>,
    pub shares: u64,
    /// The link's key pools were on a tmpfs of huge pages.
    pub key_huge_pages: bool,
    pub rounds: Vec<Round>,
    /// Where a put's time went, on average over the puts.
    pub put_latency: PutLatency,
}

/// The mean time of one put, in microseconds, and its parts: what the put's throughput at a
/// given number of puts in flight comes from (puts in flight / `put` = puts per second).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PutLatency {
    /// The client's put call, from the request to its acknowledgement.
    pub put: f64,
    /// Through the daemon: from the PUT frame's head read to its tag verified (the share's
    /// transfer, opened piece by piece as it came).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_open: Option<f64>,
    /// Through the daemon: from the tag verified to the blocking work with the share (the
    /// store's put) starting on the connection's thread, once it has handed the worker's
    /// other tasks to another thread (`block_in_place`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_thread: Option<f64>,
    /// In the store: checks, allocation, the wait for a place among the volume's writes, the
    /// durable write, the index entry.
    pub store: f64,
    /// Of the store's time: the wait for a place among the share writes at the volume
    /// (`limits.write_depth`, the bench's `--jobs`).
    pub write_queue: f64,
    /// Of the durable write: from the volume's thread taking it to its data written (with
    /// `--durability rwf-dsync` or `o-dsync`, the flush included)...
    pub volume_write: f64,
    /// ...then the wait for the group fdatasync that made it durable.
    pub flush_wait: f64,
    /// Group fdatasyncs per put (each covers every durable write completed before it: 0.25
    /// when four puts in flight share every flush, 1 when each has its own).
    pub syncs_per_put: f64,
}

impl PutLatency {
    /// Means over the puts of a run, from what the client, the server (`link`, daemon only)
    /// and the store added during it.
    fn of(client_put_ns: u64, store: PutTimes, link: Option<LinkTimes>) -> Self {
        let per = |x: u64, n: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
        let mean = |ns: u64, n: u64| per(ns, n) / 1e3;
        let w = store.volume;
        PutLatency {
            put: mean(client_put_ns, store.puts),
            link_open: link.map(|l| mean(l.open_ns, l.shares)),
            to_thread: link.map(|l| mean(l.to_thread_ns, l.shares)),
            store: mean(store.store_ns, store.puts),
            write_queue: mean(store.write_queue_ns, store.puts),
            volume_write: mean(w.write_ns, w.writes),
            flush_wait: mean(w.flush_wait_ns, w.writes),
            syncs_per_put: per(w.syncs, store.puts),
        }
    }
}

/// fio as the baseline: its own file (prepared as the volume is, see
/// [`crate::volume::create_file_volume`]), each round at its own offset in it.
pub struct FioBaseline<'a> {
    pub file: &'a Path,
    pub iodepth: usize,
}

/// Wall-clock and per-CPU-second MB/s of `f` moving `bytes`.
fn rates<E>(bytes: u64, f: impl FnOnce() -> Result<(), E>) -> Result<(f64, f64), E> {
    let (start, cpu) = (Instant::now(), qgenome::process_cpu());
    f()?;
    let wall = start.elapsed().as_secs_f64();
    let cpu = (qgenome::process_cpu() - cpu).as_secs_f64();
    Ok((bytes as f64 / wall / 1e6, bytes as f64 / cpu / 1e6))
}

/// Runs `op(phase, i, scratch)` for shares `0..count` from `threads[0]` threads for the puts
/// and `threads[1]` for the gets (each with its own `scratch`, made by `scratch(thread)`
/// before timing starts): every put, then every get, each phase cut into `rounds` slices with
/// fio over the same bytes beside each slice.
fn drive<S: Send>(
    count: u64,
    share_len: usize,
    threads: [usize; 2],
    rounds: u64,
    fio: Option<&FioBaseline<'_>>,
    scratch: impl Fn(usize) -> S + Sync,
    op: impl Fn(Phase, u64, &mut S) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<(Vec<Round>, [Totals; 2])> {
    let rounds = rounds.clamp(1, count.max(1));
    let mut scratches: Vec<S> = (0..threads[0].max(threads[1])).map(&scratch).collect();
    let mut out = Vec::new();
    let mut totals = [Totals::default(), Totals::default()];
    for (p, phase) in [Phase::Put, Phase::Get].into_iter().enumerate() {
        for r in 0..rounds {
            let (lo, hi) = (count * r / rounds, count * (r + 1) / rounds);
            let (offset, bytes) = (lo * share_len as u64, (hi - lo) * share_len as u64);
            let ours = |scratches: &mut Vec<S>| {
                let next = AtomicU64::new(lo);
                rates(bytes, || {
                    std::thread::scope(|s| {
                        let hs: Vec<_> = scratches
                            .iter_mut()
                            .take(threads[p])
                            .map(|sc| {
                                let (next, op) = (&next, &op);
                                s.spawn(move || -> anyhow::Result<()> {
                                    loop {
                                        let i = next.fetch_add(1, Ordering::Relaxed);
                                        if i >= hi {
                                            return Ok(());
                                        }
                                        op(phase, i, sc)?;
                                    }
                                })
                            })
                            .collect();
                        hs.into_iter()
                            .try_for_each(|h| h.join().expect("bench thread"))
                    })
                })
            };
            let theirs = || -> anyhow::Result<(Option<f64>, Option<f64>)> {
                let Some(f) = fio else {
                    return Ok((None, None));
                };
                let run = |rw: &str, extra: &[&str]| {
                    let at = format!("--offset={offset}");
                    let mut args = vec![at.as_str()];
                    args.extend_from_slice(extra);
                    run_fio(f.file, rw, bytes, f.iodepth, &args).map_err(anyhow::Error::msg)
                };
                Ok(match phase {
                    Phase::Put => (
                        Some(run("write", &[])?),
                        Some(run("write", &["--sync=dsync"])?),
                    ),
                    Phase::Get => (Some(run("read", &[])?), None),
                })
            };
            let ((mbps, cpu_mbps), (fio_mbps, fio_dsync_mbps)) = if r % 2 == 0 {
                let o = ours(&mut scratches)?;
                (o, theirs()?)
            } else {
                let t = theirs()?;
                (ours(&mut scratches)?, t)
            };
            totals[p].add(bytes, mbps, cpu_mbps, fio_mbps, fio_dsync_mbps);
            out.push(Round {
                phase,
                shares: hi - lo,
                mbps,
                cpu_mbps,
                fio_mbps,
                fio_dsync_mbps,
            });
        }
    }
    Ok((out, totals))
}

/// Seconds summed over rounds, for rates over the whole phase.
#[derive(Default, Clone, Copy)]
struct Totals {
    bytes: f64,
    secs: f64,
    cpu_secs: f64,
    fio_secs: Option<f64>,
    fio_dsync_secs: Option<f64>,
}

impl Totals {
    fn add(&mut self, bytes: u64, mbps: f64, cpu: f64, fio: Option<f64>, dsync: Option<f64>) {
        let b = bytes as f64 / 1e6;
        self.bytes += b;
        self.secs += b / mbps;
        self.cpu_secs += b / cpu;
        let sum = |acc: Option<f64>, rate: Option<f64>| rate.map(|r| acc.unwrap_or(0.0) + b / r);
        self.fio_secs = sum(self.fio_secs, fio);
        self.fio_dsync_secs = sum(self.fio_dsync_secs, dsync);
    }

    fn rate(&self, secs: Option<f64>) -> Option<f64> {
        secs.map(|s| self.bytes / s)
    }
}

fn results(
    rounds: Vec<Round>,
    [put, get]: [Totals; 2],
    shares: u64,
    huge: bool,
    put_latency: PutLatency,
) -> StoreBench {
    StoreBench {
        put_mbps: put.bytes / put.secs,
        get_mbps: get.bytes / get.secs,
        put_cpu_mbps: put.bytes / put.cpu_secs,
        get_cpu_mbps: get.bytes / get.cpu_secs,
        fio_write_mbps: put.rate(put.fio_secs),
        fio_write_dsync_mbps: put.rate(put.fio_dsync_secs),
        fio_read_mbps: get.rate(get.fio_secs),
        shares,
        key_huge_pages: huge,
        rounds,
        put_latency,
    }
}

/// Puts `count` shares of `share_len` bytes from `jobs` threads, then gets (and verifies) them
/// all, then deletes them. Share contents are made before timing starts.
pub fn bench_store<D: BlockDevice>(
    store: &Store<D>,
    count: u64,
    share_len: usize,
    jobs: usize,
    rounds: u64,
    fio: Option<&FioBaseline<'_>>,
) -> anyhow::Result<StoreBench> {
    let mut file_id = [0u8; 16];
    getrandom::getrandom(&mut file_id).expect("OS randomness");
    let template = |j: usize| {
        let mut v = vec![0u8; share_len];
        pattern(j as u64, &run_key(file_id, j as u64), &mut v);
        v
    };
    let (put_ns, before) = (AtomicU64::new(0), store.put_times());
    let driven = drive(
        count,
        share_len,
        [jobs, jobs],
        rounds,
        fio,
        template,
        |phase, i, tpl| {
            let key = run_key(file_id, i);
            match phase {
                Phase::Put => {
                    let mut b = store.share_buf(share_len);
                    b.as_mut_slice().copy_from_slice(tpl);
                    b.as_mut_slice()[..8].copy_from_slice(&i.to_le_bytes());
                    let t = Instant::now();
                    store.put_buf(key, RUN_META, b)?;
                    add_nanos(&put_ns, t.elapsed());
                }
                Phase::Get => {
                    let d = store.get(&key)?;
                    anyhow::ensure!(d.bytes()[..8] == i.to_le_bytes(), "share {key} differs");
                }
            }
            Ok(())
        },
    );
    // Before the deletes, whose tombstones are durable writes too.
    let latency = PutLatency::of(put_ns.into_inner(), store.put_times().since(&before), None);
    // The run's shares go whether it succeeded or not (fio missing, the volume full, a share
    // that read back wrong): on a site's own volume they would stay indexed for good, under
    // a file id no catalog knows.
    let cleaned = (0..count).try_for_each(|i| match store.delete(&run_key(file_id, i)) {
        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    });
    let (rounds, totals) = driven?;
    cleaned?;
    Ok(results(rounds, totals, count, false, latency))
}

/// fio's result for one job, in MB/s.
pub fn run_fio(
    file: &Path,
    rw: &str,
    size: u64,
    iodepth: usize,
    extra: &[&str],
) -> Result<f64, String> {
    let out = Command::new("fio")
        .arg("--name=qgenome-baseline")
        .arg(format!("--filename={}", file.display()))
        .args([
            "--direct=1",
            "--ioengine=io_uring",
            "--bs=1M",
            "--output-format=json",
        ])
        .arg(format!("--size={size}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--iodepth={iodepth}"))
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run fio (install it with scripts/install-deps.sh): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio {rw} on {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print warnings before the JSON object.
    let json = text
        .find('{')
        .map(|i| &text[i..])
        .ok_or("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}"))?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    let bw = v["jobs"][0][dir]["bw_bytes"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON has no jobs[0].{dir}.bw_bytes"))?;
    Ok(bw / 1e6)
}

/// Throughput of puts and gets through the share server over loopback TCP with every frame
/// sealed: the daemon's code path (`server::Server`, in this process on its own tokio
/// runtime) and the client (`MountdSite`), with a link provisioned under `key_root` (use
/// tmpfs so that the volume path is what is measured; removed afterwards).
///
/// Puts `count` shares of `share_len` bytes from `connections` client threads (the store
/// given by the caller lets `jobs` writes reach the volume at once: `StoreOptions::write_depth`),
/// then gets (and verifies) them from `jobs` threads, then deletes them.
#[allow(clippy::too_many_arguments)]
pub fn bench_daemon<D: BlockDevice>(
    store: Store<D>,
    count: u64,
    share_len: usize,
    jobs: usize,
    connections: usize,
    rounds: u64,
    fio: Option<&FioBaseline<'_>>,
    key_root: &Path,
) -> anyhow::Result<StoreBench> {
    use crate::config::{LinkConfig, LinkEnd};
    use crate::server::{LinkEnds, Listeners, Server, ServerLimits};
    use anyhow::Context;
    use qgenome::sites::{LinkKeys, MountdSite, ShareKey as WKey, ShareMeta as WMeta, ShareSite};
    use std::sync::Arc;
    let work = key_root.join(format!("qgenome-bench-keys-{}", std::process::id()));
    let (a, b) = (work.join("a"), work.join("b"));
    let window = 64 << 20;
    // Each share: a PUT, a GET and a DELETE one way, their answers the other, each frame on
    // whole key blocks; the larger of the two directions, plus room for the rest.
    let frame_key =
        |payload: usize| qgenome::wire::frame::key_len_for(payload as u64).expect("a share");
    let block = qgenome::wire::frame::KEY_BLOCK;
    let per_share = frame_key(qgenome::wire::msg::PUT_HEAD_LEN + share_len)
        .max(frame_key(qgenome::wire::msg::DATA_HEAD_LEN + share_len))
        + 2 * block;
    let key_len = count * per_share + 1024 * block + 4 * window;
    std::fs::create_dir_all(&work).with_context(|| {
        format!(
            "--key-dir {}: cannot make the bench's key directory {}",
            key_root.display(),
            work.display()
        )
    })?;
    // Pools in RAM go on a tmpfs of huge pages, as a deployment keeping them in RAM should
    // (see qgenome::keys::tmpfs): four of them, both directions at both ends.
    let huge = qgenome::keys::tmpfs::HugeTmpfs::over_tmpfs(&work, 4 * key_len + (64 << 20));
    let res = (|| -> anyhow::Result<StoreBench> {
        std::fs::create_dir_all(&a)?;
        std::fs::create_dir_all(&b)?;
        qgenome::keys::pool::provision("bench", key_len, &a, &b)?;
        let link = LinkConfig {
            name: "bench".into(),
            key_dir: b.clone(),
            end: LinkEnd::B,
            window,
        };
        let ends = LinkEnds::open(&link)?;
        // Room for every connection the client opens (puts, then gets).
        let conns = 64.max(connections.max(jobs));
        let limits = ServerLimits {
            max_connections: conns,
            max_unwelcomed_per_address: conns,
            max_inflight_bytes: 1 << 30,
            frame_timeout: std::time::Duration::from_secs(60),
            idle_timeout: std::time::Duration::from_secs(300),
            max_share_len: crate::store::StoreOptions::default()
                .max_share_len
                .min(qgenome::wire::msg::MAX_DATA as u64),
        };
        let server = Arc::new(Server::new(store, vec![ends], limits));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let tcp = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = tcp.local_addr()?.to_string();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let srv = server.clone();
        let handle = rt.spawn(async move {
            srv.run(
                Listeners {
                    unix: None,
                    tcp: Some(tcp),
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        });
        let keys = LinkKeys {
            dir: a.clone(),
            link: "bench".into(),
            end: qgenome::keys::End::A,
            options: qgenome::link::StreamOptions { window },
        };
        let mut client = MountdSite::tcp("bench", &addr, &keys)?;
        client.set_pool_size(connections.max(jobs));
        let mut file = [0u8; 16];
        getrandom::getrandom(&mut file).expect("OS randomness");
        let meta = WMeta {
            k: 2,
            n: 3,
            secret_len: share_len as u32,
        };
        let key = |i: u64| WKey {
            file,
            chunk: i,
            share: (i % 3) as u8,
        };
        let mut tpl = vec![0u8; share_len];
        pattern(1, &run_key(file, 0), &mut tpl);
        // Puts send one buffer per thread, stamped with the share's number; gets land in
        // one buffer per thread, as the engine's reads do.
        let scratch = |_| (tpl.clone(), Vec::new());
        let put_ns = AtomicU64::new(0);
        let before = (server.link_times(), server.store().put_times());
        let driven = drive(
            count,
            share_len,
            [connections, jobs],
            rounds,
            fio,
            scratch,
            |phase, i, (data, got)| {
                match phase {
                    Phase::Put => {
                        data[..8].copy_from_slice(&i.to_le_bytes());
                        let t = Instant::now();
                        client.put(&key(i), &meta, data)?;
                        add_nanos(&put_ns, t.elapsed());
                    }
                    Phase::Get => {
                        client.get_into(&key(i), got)?;
                        anyhow::ensure!(
                            got.len() == share_len && got[..8] == i.to_le_bytes(),
                            "share {i} differs"
                        );
                    }
                }
                Ok(())
            },
        );
        let latency = PutLatency::of(
            put_ns.into_inner(),
            server.store().put_times().since(&before.1),
            Some(server.link_times().since(&before.0)),
        );
        // As in the store bench: gone whatever happened.
        let cleaned = (0..count).try_for_each(|i| match client.delete(&key(i)) {
            Ok(()) | Err(qgenome::sites::SiteError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        });
        let (rounds, totals) = driven?;
        cleaned?;
        drop(client);
        let _ = stop_tx.send(());
        rt.block_on(handle)??;
        Ok(results(rounds, totals, count, huge.is_some(), latency))
    })();
    drop(huge);
    let _ = std::fs::remove_dir_all(&work);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_seed_and_key_only() {
        let k = run_key([1; 16], 5);
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        pattern(9, &k, &mut a);
        pattern(9, &k, &mut b);
        assert_eq!(a, b);
        pattern(10, &k, &mut b);
        assert_ne!(a, b);
        pattern(9, &run_key([1; 16], 6), &mut b);
        assert_ne!(a, b);
    }
}
