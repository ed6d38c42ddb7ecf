//! Crash torture of the sender's ledger: a child process seals frames with a tiny window
//! (a ledger write every few frames) and is SIGKILLed at random moments, many times: once it
//! has printed a random number of frames, after a random pause of up to 2 ms.
//!
//! The child wraps its pool in a key source that writes every key read to stdout with a raw
//! `write(2)` *before* handing the key out, so key that was used but whose frame never got
//! printed is still on record. The parent asserts that no key byte was read in two runs,
//! and that the ledger value each restart resumes from is at or above every byte read
//! before. (If the ledger were persisted after use instead of before, a kill between use
//! and persist makes the next run read the same key: both assertions catch that.)
//! Then all recorded frames go to a receiver: each accepted once, replays rejected, also
//! after the receiver restarts.
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// The child, run by the test binary re-executed with `CHILD_ENV` set to the pools' directory:
/// seals until killed.
fn torture_child(dir: &Path) {
    let key = PoolFile::open(dir, LINK, Direction::AtoB, End::A).unwrap();
    let lp = ledger_path(dir, LINK, Direction::AtoB);
    let led = open_ledger(&lp, Role::Sender, &key).unwrap();
    let mut s = SendStream::with_parts(
        Box::new(LoggingKey(key)),
        Box::new(led),
        StreamOptions { window: WINDOW },
    )
    .unwrap();
    // The leading newline ends the test harness's "test ... " line, if it left one open.
    raw_stdout(&format!("\nSTART {}\n", s.next_offset()));
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
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        // This binary re-executed by the test below: be the child, never the test.
        torture_child(Path::new(&dir));
        std::process::exit(0);
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
    for run in 0..runs {
        let resume = ledger::peek(&lp, LINK).unwrap().map_or(0, |s| s.value);
        assert!(
            resume >= max_read_end,
            "run {run}: ledger resumes at {resume} but key up to {max_read_end} was already read"
        );
        // The kill lands once the child has printed a random number of frames (none: right
        // after it opened its ledger), after a random pause of up to 2 ms; not after a random
        // time, which on a busy machine can pass before the child even starts. At most half
        // its frames, so that it is still sealing when the kill lands.
        let target = (rand() % (FRAMES_PER_RUN as u64 / 2 + 1)) as usize;
        let pause = Duration::from_micros(rand() % 2_001);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_moments_never_reuses_key",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &a)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            // Lines as they come, with their newline: the last one may be cut by the kill.
            let mut out = out;
            loop {
                let mut line = Vec::new();
                if out.read_until(b'\n', &mut line).unwrap() == 0 {
                    return;
                }
                if tx.send(String::from_utf8(line).unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut lines = Vec::new();
        let (mut started, mut printed) = (false, 0usize);
        let waited = Instant::now();
        while !started || printed < target {
            let left = Duration::from_secs(120).saturating_sub(waited.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let whole = line.ends_with('\n');
                    started |= whole && line.starts_with("START ");
                    printed += (whole && line.starts_with("FRAME ")) as usize;
                    lines.push(line);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "run {run}: the child printed {printed} of {target} frames, then {e}:\n{}",
                        lines.join("\n")
                    );
                }
            }
        }
        std::thread::sleep(pause);
        child.kill().unwrap();
        child.wait().unwrap();
        lines.extend(rx.iter());
        reader.join().unwrap();
        // A line cut by the kill (no newline) is not on record. (None should be: each line
        // goes out in one write of at most PIPE_BUF bytes, which a pipe takes whole; and the
        // key is read only once its line is out.)
        let mut any = 0usize;
        let mut done = false;
        for line in lines.iter().filter(|l| l.ends_with('\n')) {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("READ") => {
                    let s: u64 = w.next().unwrap().parse().unwrap();
                    let e: u64 = w.next().unwrap().parse().unwrap();
                    reads.push((run, s..e));
                    max_read_end = max_read_end.max(e);
                }
                Some("FRAME") => {
                    frames.push(unhex(w.next().unwrap()));
                    any += 1;
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
        assert!(
            any >= target,
            "run {run}: killed after {target} frames, {any} recorded"
        );
        runs_with_frames += (any > 0) as usize;
        killed_mid_stream += (any > 0 && !done) as usize;
    }
    // Every run was killed after its target number of frames (asserted above). Its other
    // half takes the child tens of ms even on tmpfs, against a pause of 2 ms at most, so
    // kills land while it seals; only a parent stalled that long lets a child finish first.
    assert!(
        killed_mid_stream * 2 >= runs_with_frames,
        "only {killed_mid_stream} of {runs_with_frames} runs with frames were killed while \
         sealing: the children got through all their frames before the kill"
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
