//! qgenome: genome storage by XOR threshold secret sharing over one-time-pad links.
//!
//! # Layout
//!
//! - [`sharing`]: the Kurihara XOR (k,n) threshold scheme, XOR kernels, randomness sources.
//! - [`catalog`]: the home site's sled catalog (patients, files, chunks, share locations,
//!   audit) and the per-file Merkle tree.
//! - [`sites`]: the share-site boundary (trait, in-memory fault-injecting site).
//! - [`placement`]: share control: which site holds which share, read order.
//! - [`consent`]: consent sessions and the audit of every grant, refusal and end.
//! - [`fs`]: the data path (split-on-write, rebuild-on-read) and the FUSE tree.
//! - [`keys`]: key sources: pre-shared pool files (and later ETSI GS QKD 014).
//! - [`link`]: one-time-pad + Wegman–Carter sealing of frames, key streams, key ledger.
//! - [`wire`]: byte formats shared with mountd (frame header, share protocol messages).
//! - [`config`]: the home node's TOML configuration.
//! - [`control`]: the running mount's control socket (JSON lines).
//! - [`deploy`]: a whole local deployment (pools, volumes, daemons, mount) for the demo,
//!   benchmarks and integration tests.
//! - [`cli`]: the `qgenome` subcommands (argument parsing and dispatch only).
//! - [`harden`]: keeping plaintext and key bytes out of swap and core dumps.
//! - [`notify`]: systemd readiness (`sd_notify`), for `qgenome mount` and `qgenome-mountd`.
//!
//! Byte-level formats and the reasons behind the choices are in `docs/design.md`.
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consent;
pub mod control;
pub mod deploy;
pub mod fs;
pub mod harden;
pub mod keys;
pub mod link;
pub mod notify;
pub mod placement;
pub mod sharing;
pub mod sites;
pub mod wire;

/// Keep large buffers in the allocator's heap instead of a fresh `mmap` per allocation.
///
/// The data path allocates and frees buffers of a chunk or a share (about 1 MiB) at a high
/// rate. glibc serves those with `mmap` and returns them with `munmap`, so every one costs a
/// page fault and a page clear per 4 KiB (about 5% of a site daemon's CPU, measured). With the
/// threshold at its 32 MiB maximum and a matching trim threshold, freed buffers are reused.
/// Called first thing by the `qgenome` and `qgenome-mountd` binaries.
pub fn tune_malloc() {
    const THRESHOLD: libc::c_int = 32 << 20;
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * THRESHOLD);
    }
}

/// An error and its causes on one line, as `{:#}` prints them, but leaving out a cause whose
/// text the line already holds (most of our errors name their cause in their own message).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// CPU time of the whole process so far (all threads). Benchmarks report throughput per
/// CPU-second beside wall-clock throughput: on a shared machine it moves far less.
pub fn process_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Overwrite a buffer, spare capacity included, with zeros: one memset per region, kept from
/// being optimised away by `black_box` (and by the buffer living on in a pool). `zeroize`'s
/// volatile byte-at-a-time loop cost ~0.35 ms per MiB here, a tenth of the write path's CPU.
pub fn wipe(v: &mut Vec<u8>) {
    v.fill(0);
    v.spare_capacity_mut().fill(std::mem::MaybeUninit::new(0));
    std::hint::black_box(&mut *v);
}

/// `v.resize(len, 0)`, except that growing past its capacity leaves no copy behind: a
/// reallocation would free the old block, contents and all, to the allocator. The old buffer
/// is wiped and freed instead, and a fresh one of `len` zeros takes its place.
pub fn resize_wiped(v: &mut Vec<u8>, len: usize) {
    if len > v.capacity() {
        let mut old = std::mem::replace(v, vec![0; len]);
        wipe(&mut old);
    } else {
        v.resize(len, 0);
    }
}

#[cfg(test)]
mod resize_tests {
    #[test]
    fn growing_past_capacity_wipes_the_old_block() {
        let mut v = vec![0xa5u8; 100];
        let old = v.as_ptr();
        super::resize_wiped(&mut v, 50);
        assert_eq!(
            (v.len(), v.as_ptr()),
            (50, old),
            "shrinking keeps the block"
        );
        super::resize_wiped(&mut v, 100);
        assert_eq!(v.as_ptr(), old, "within capacity, in place");
        super::resize_wiped(&mut v, 1 << 20);
        assert_ne!(v.as_ptr(), old);
        assert!(v.iter().all(|&b| b == 0));
    }
}

#[cfg(test)]
mod error_line_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("volume v: cannot format: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_names_is_said_once() {
        let inner = std::io::Error::other("too small");
        let e = anyhow::Error::new(Outer { source: inner }).context("format");
        assert_eq!(
            super::error_line(&e),
            "format: volume v: cannot format: too small"
        );
        let e = anyhow::anyhow!("plain").context("outer");
        assert_eq!(super::error_line(&e), "outer: plain");
    }
}
