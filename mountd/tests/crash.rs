//! kill -9 during a stream of puts, several times at random moments: every acknowledged share
//! reads back identical, nothing unacknowledged is served unless it is byte-identical (its put
//! completed but the kill came before the ACK line), and later puts never overwrite earlier ones.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use qgenome_mountd::bench::{pattern, run_key};
use qgenome_mountd::store::{FormatOptions, Store, StoreError, StoreOptions};
use qgenome_mountd::volume::{create_file_volume, UringOptions, UringVolume};

const SHARE: usize = 48 << 10;
const JOBS: u64 = 3;

fn open(vol: &Path, state: &Path) -> Store<UringVolume> {
    let dev = UringVolume::open(vol, &UringOptions::default()).unwrap();
    Store::open(dev, state, StoreOptions::default()).unwrap()
}

fn expected(seed: u64, file: u8, i: u64) -> Vec<u8> {
    let mut id = [0u8; 16];
    id[0] = file;
    let mut v = vec![0u8; SHARE];
    pattern(seed, &run_key(id, i), &mut v);
    v
}

fn key(file: u8, i: u64) -> qgenome_mountd::layout::ShareKey {
    let mut id = [0u8; 16];
    id[0] = file;
    run_key(id, i)
}

#[test]
fn kill_9_during_puts_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("crash.vol");
    let state = dir.path().join("state");
    create_file_volume(&vol, 256 << 20, false).unwrap();
    Store::format(
        &UringVolume::open(&vol, &UringOptions::default()).unwrap(),
        "crash",
        &FormatOptions::default(),
    )
    .unwrap();
    let mut rng = [0u8; 8];
    getrandom::getrandom(&mut rng).unwrap();
    let mut r = u64::from_le_bytes(rng) | 1;
    eprintln!("random seed {r:#x}");
    let mut next = move || {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        r
    };
    // (file, seed, acknowledged chunk numbers) of every round so far.
    let mut rounds: Vec<(u8, u64, BTreeSet<u64>)> = Vec::new();
    // Shares the starts found in open regions, their index entries lost with the kill.
    let mut recovered = 0;
    for round in 0..6u8 {
        let file = round + 1;
        let seed = next();
        let kill_after = 5 + next() % 250;
        let mut child = Command::new(env!("CARGO_BIN_EXE_qgenome-mountd"))
            .args([
                "stress",
                "--file",
                &file.to_string(),
                "--seed",
                &seed.to_string(),
            ])
            .args([
                "--count",
                "100000",
                "--share-size",
                &SHARE.to_string(),
                "--jobs",
                &JOBS.to_string(),
            ])
            .arg("--volume")
            .arg(&vol)
            .arg("--state")
            .arg(&state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = BTreeSet::new();
        while acked.len() < kill_after as usize {
            let line = lines.next().expect("child ended early").unwrap();
            acked.insert(line.strip_prefix("ACK ").unwrap().parse::<u64>().unwrap());
        }
        // Land the kill at a random point inside a put, not right after an ACK.
        std::thread::sleep(std::time::Duration::from_micros(next() % 3000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in lines {
            acked.insert(
                line.unwrap()
                    .strip_prefix("ACK ")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
        let highest = *acked.iter().max().unwrap();
        rounds.push((file, seed, acked));

        let store = open(&vol, &state);
        let found = store.recovered_at_open();
        recovered += found;
        for (file, seed, acked) in &rounds {
            for &i in acked {
                let got = store
                    .get(&key(*file, i))
                    .unwrap_or_else(|e| panic!("round {round}: acked share lost: {e}"));
                assert!(
                    got.bytes() == &expected(*seed, *file, i)[..],
                    "acked share {file}/{i} differs"
                );
            }
        }
        // Unacknowledged puts: absent, or (put returned, ACK line not yet written) identical.
        let (_, seed, acked) = rounds.last().unwrap();
        let mut complete_unacked = 0;
        for i in 0..highest + 2 * JOBS + 2 {
            if acked.contains(&i) {
                continue;
            }
            match store.get(&key(file, i)) {
                Err(StoreError::NotFound { .. }) => {}
                Ok(d) => {
                    assert!(
                        d.bytes() == &expected(*seed, file, i)[..],
                        "unacked share {i} served with wrong bytes"
                    );
                    complete_unacked += 1;
                }
                Err(e) => panic!("unexpected error for unacked share {i}: {e}"),
            }
        }
        assert!(
            complete_unacked <= JOBS,
            "{complete_unacked} unacked shares present"
        );
        let scrub = store.scrub().unwrap();
        assert!(scrub.damaged.is_empty(), "{:?}", scrub.damaged);
        assert_disjoint(&store, &format!("round {round}"));
        eprintln!(
            "round {round}: {} acked, highest {highest}, {complete_unacked} completed unacked, {found} found by the start",
            rounds.last().unwrap().2.len()
        );
    }
    // A put is acknowledged before its index entry is flushed (within 20 ms, for the puts of
    // that time together): kills land in between, and the start finds those shares again.
    assert!(
        recovered > 0,
        "no kill left an acknowledged share for the start to find"
    );
    // A last batch of puts in-process, then everything acknowledged is still there.
    let store = open(&vol, &state);
    for i in 0..200 {
        store
            .put(
                key(100, i),
                qgenome_mountd::bench::RUN_META,
                &expected(7, 100, i),
            )
            .unwrap();
    }
    for (file, seed, acked) in &rounds {
        for &i in acked {
            assert!(store.get(&key(*file, i)).unwrap().bytes() == &expected(*seed, *file, i)[..]);
        }
    }
    assert_disjoint(&store, "after the last batch");
}

/// No two shares in the index share a byte of the volume: the allocator never handed out
/// the same space twice, whatever the kills left.
fn assert_disjoint(store: &Store<UringVolume>, when: &str) {
    let mut extents: Vec<(u64, u64, String)> = store
        .list()
        .map(|e| {
            let (k, e) = e.unwrap();
            (e.offset, e.offset + e.extent_len, format!("{k:?}"))
        })
        .collect();
    assert!(!extents.is_empty());
    extents.sort();
    for w in extents.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "{when}: {} at {}..{} overlaps {} at {}..{}",
            w[0].2,
            w[0].0,
            w[0].1,
            w[1].2,
            w[1].0,
            w[1].1
        );
    }
}
