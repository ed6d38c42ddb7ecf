//! Crash torture of the sender's ledger: a child process seals frames with a tiny window
//! (a ledger write every few frames) and is SIGKILLed at random moments, many times.
//!
//! The child wraps its pool in a key source that writes every key read to stdout with a raw
//! `write(2)` *before* handing the key out, so key that was used but whose frame never got
//! printed is still on record. The parent asserts that no key byte was read in two runs,
//! and that the ledger value each restart resumes from is at or above every byte read
//! before. (If the ledger were persisted after use instead of before, a kill between use
//! and persist makes the next run read the same key: both assertions catch that.)
//! Then all recorded frames go to a receiver: each accepted once, replays rejected, also
//! after the receiver restarts.
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use qgenome::keys::{pool, Destroyed, Direction, End, KeyError, KeySource, PoolFile, StreamInfo};
use qgenome::link::ledger::{self, Role};
use qgenome::link::stream::{ledger_path, open_ledger};
use qgenome::link::{LinkError, RecvStream, SendStream, StreamOptions};

const LINK: &str = "torture";
const CHILD_ENV: &str = "QGENOME_TORTURE_CHILD_DIR";
const WINDOW: u64 = 3000;
/// Frames one child seals before it idles until the kill. Bounds the key a run can use
/// (1000 frames of at most 1499 + 32 bytes, plus one wasted window), so the pool below
/// lasts all runs however fast this machine's fdatasync is: with an unbounded child, a
/// fast disk used up a 4 MiB pool within a few runs.
const FRAMES_PER_RUN: usize = 1000;
const RUNS: usize = 40;
const POOL: u64 = 64 << 20;

/// Logs every key read (offset, length) to fd 1 before returning the key.
struct LoggingKey(PoolFile);

fn raw_stdout(line: &str) {
    let b = line.as_bytes();
    // SAFETY: write(2) of a valid buffer to fd 1; no buffering, so the line is in the pipe
    // when this returns even if the process is killed right after.
    let n = unsafe { libc::write(1, b.as_ptr().cast(), b.len()) };
    assert_eq!(n, b.len() as isize);
}

impl KeySource for LoggingKey {
    fn info(&self) -> &StreamInfo {
        self.0.info()
    }
    fn location(&self) -> &Path {
        self.0.location()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), KeyError> {
        raw_stdout(&format!("READ {} {}\n", offset, offset + buf.len() as u64));
        self.0.read_at(offset, buf)
    }
    fn destroy(&self, range: Range<u64>) -> Result<Destroyed, KeyError> {
        self.0.destroy(range)
    }
    fn sync(&self) -> Result<(), KeyError> {
        self.0.sync()
    }
}

/// The child: runs only when the parent sets `CHILD_ENV`; seals until killed.
#[test]
fn torture_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let key = PoolFile::open(&dir, LINK, Direction::AtoB, End::A).unwrap();
    let lp = ledger_path(&dir, LINK, Direction::AtoB);
    let led = open_ledger(&lp, Role::Sender, &key).unwrap();
    let mut s = SendStream::with_parts(
        Box::new(LoggingKey(key)),
        Box::new(led),
        StreamOptions { window: WINDOW },
    )
    .unwrap();
    raw_stdout(&format!("START {}\n", s.next_offset()));
    let mut frame = Vec::new();
    let mut x = std::process::id() as u64 | 1;
    for _ in 0..FRAMES_PER_RUN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 1500) as usize;
        let p = vec![(x >> 20) as u8; len];
        match s.seal(&p, &mut frame) {
            Ok(_) => raw_stdout(&format!("FRAME {}\n", hex(&frame))),
            Err(LinkError::Exhausted { .. }) => {
                raw_stdout("EXHAUSTED\n");
                std::thread::sleep(Duration::from_secs(60));
            }
            Err(e) => panic!("{e}"),
        }
    }
    raw_stdout("DONE\n");
    std::thread::sleep(Duration::from_secs(60));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn sigkill_at_random_moments_never_reuses_key() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    // On the real filesystem (not tmpfs) so fdatasync takes real time and kills land
    // inside ledger writes too.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (a, b) = (base.path().join("a"), base.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    const {
        assert!(RUNS as u64 * (FRAMES_PER_RUN as u64 * (1499 + 32) + WINDOW) < POOL);
    }
    pool::provision(LINK, POOL, &a, &b).unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("torture seed {seed}");
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let exe = std::env::current_exe().unwrap();
    let lp = ledger_path(&a, LINK, Direction::AtoB);
    let mut reads: Vec<(usize, Range<u64>)> = Vec::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut max_read_end = 0u64;
    let runs = RUNS;
    let mut runs_with_frames = 0;
    let mut killed_mid_stream = 0;
    // Kills land up to this long after the start; shortened whenever a child got through
    // all its frames first, so that on a fast machine most kills still hit work.
    let mut max_delay_us = 40_000u64;
    for run in 0..runs {
        let resume = ledger::peek(&lp, LINK).unwrap().map_or(0, |s| s.value);
        assert!(
            resume >= max_read_end,
            "run {run}: ledger resumes at {resume} but key up to {max_read_end} was already read"
        );
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "torture_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &a)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            out.read_to_string(&mut s).unwrap();
            s
        });
        // Startup takes a few ms; kill anywhere from before the pool opens to mid-stream.
        std::thread::sleep(Duration::from_micros(1_000 + rand() % max_delay_us));
        child.kill().unwrap();
        child.wait().unwrap();
        let text = reader.join().unwrap();
        let mut any = false;
        let mut done = false;
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("READ") => {
                    let s: u64 = w.next().unwrap().parse().unwrap();
                    let e: u64 = w.next().unwrap().parse().unwrap();
                    reads.push((run, s..e));
                    max_read_end = max_read_end.max(e);
                }
                Some("FRAME") => {
                    // A line cut by the kill is not a frame.
                    let h = w.next().unwrap_or("");
                    if line.len() == text.len() || !h.is_empty() && h.len() % 2 == 0 {
                        frames.push(unhex(h));
                        any = true;
                    }
                }
                Some("START") => {
                    let s: u64 = w.next().unwrap().parse().unwrap();
                    assert!(
                        s >= resume,
                        "run {run} started at {s} below ledger {resume}"
                    );
                }
                Some("EXHAUSTED") => panic!("pool too small for the torture"),
                Some("DONE") => done = true,
                _ => {}
            }
        }
        runs_with_frames += any as usize;
        if done {
            max_delay_us = (max_delay_us * 2 / 3).max(2_000);
        } else if any {
            killed_mid_stream += 1;
        }
    }
    assert!(
        killed_mid_stream >= runs / 4,
        "only {killed_mid_stream} of {runs} runs were killed while sealing: the kills never hit work"
    );
    // No key byte read by two different runs (within a run, reads are disjoint too).
    let mut sorted = reads.clone();
    sorted.sort_by_key(|(_, r)| r.start);
    for w in sorted.windows(2) {
        assert!(
            w[0].1.end <= w[1].1.start,
            "key reuse: run {} read {:?}, run {} read {:?}",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
    eprintln!(
        "{} key reads, {} frames, {} runs with frames ({} killed mid-stream), key used up to {}",
        reads.len(),
        frames.len(),
        runs_with_frames,
        killed_mid_stream,
        max_read_end
    );

    // Receiver: every complete frame is accepted once; replays are rejected, also after a
    // receiver restart. (Cut frames, if any, fail as malformed or forged.)
    let opts = StreamOptions { window: WINDOW };
    let mut r = RecvStream::from_dir(&b, LINK, Direction::AtoB, opts.clone()).unwrap();
    let mut out = Vec::new();
    let mut accepted = Vec::new();
    for f in &frames {
        match r.open(f, &mut out) {
            Ok(_) => accepted.push(f.clone()),
            Err(LinkError::BadFrame { .. }) => {}
            Err(e) => panic!("recorded frame rejected: {e}"),
        }
    }
    assert!(
        accepted.len() + 1 >= frames.len(),
        "at most one frame cut per run end"
    );
    for f in &accepted {
        assert!(matches!(
            r.open(f, &mut out),
            Err(LinkError::KeyAlreadyUsed { .. })
        ));
    }
    drop(r);
    let mut r = RecvStream::from_dir(&b, LINK, Direction::AtoB, opts).unwrap();
    for f in &accepted {
        assert!(matches!(
            r.open(f, &mut out),
            Err(LinkError::KeyAlreadyUsed { .. })
        ));
    }
}
