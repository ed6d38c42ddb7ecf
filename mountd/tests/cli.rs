//! The command line: format creates a volume, scrub finds a byte changed behind the store's back.

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use qgenome_mountd::bench::{pattern, run_key, RUN_META};
use qgenome_mountd::store::{Store, StoreOptions};
use qgenome_mountd::volume::{UringOptions, UringVolume};

fn mountd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qgenome-mountd"))
}

#[test]
fn format_then_scrub_detects_a_changed_byte_by_file_and_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("site.vol");
    let out = mountd()
        .args(["format", "--site", "osaka-2", "--size", "64M", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("osaka-2"));
    // Formatting again without --force refuses to drop the index.
    let again = mountd()
        .args(["format", "--site", "x", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let state = dir.path().join("site.vol.state");
    let file_id = *b"patient-P0001-r1";
    let target = run_key(file_id, 7);
    let offset = {
        let store = Store::open(
            UringVolume::open(&vol, &UringOptions::default()).unwrap(),
            &state,
            StoreOptions::default(),
        )
        .unwrap();
        let mut data = vec![0u8; 200_000];
        for i in 0..12 {
            pattern(1, &run_key(file_id, i), &mut data);
            store.put(run_key(file_id, i), RUN_META, &data).unwrap();
        }
        let e = store
            .list()
            .map(Result::unwrap)
            .find(|(k, _)| *k == target)
            .unwrap()
            .1;
        e.offset + u64::from(store.superblock().block_size) + 4321
    };
    let clean = mountd()
        .arg("scrub")
        .arg("--volume")
        .arg(&vol)
        .output()
        .unwrap();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("12 shares"));

    // Ordinary buffered I/O into the share's data, as bit rot or an intruder would.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vol)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x20]).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let out = mountd()
        .arg("scrub")
        .arg("--volume")
        .arg(&vol)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let hex: String = file_id.iter().map(|b| format!("{b:02x}")).collect();
    let damaged: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("DAMAGED"))
        .collect();
    assert_eq!(damaged.len(), 1, "{stdout}");
    assert!(
        damaged[0].contains(&hex) && damaged[0].contains("chunk 7 "),
        "{stdout}"
    );
    assert!(stdout.contains("1 damaged"));

    let stat = mountd()
        .arg("stat")
        .arg("--volume")
        .arg(&vol)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(v["shares"], 12);
    assert_eq!(v["site"], "osaka-2");
}

#[test]
fn rebuild_index_cli_restores_a_lost_index() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("r.vol");
    assert!(mountd()
        .args(["format", "--site", "s", "--size", "32M", "--volume"])
        .arg(&vol)
        .status()
        .unwrap()
        .success());
    let state = dir.path().join("r.vol.state");
    {
        let store = Store::open(
            UringVolume::open(&vol, &UringOptions::default()).unwrap(),
            &state,
            StoreOptions::default(),
        )
        .unwrap();
        for i in 0..20 {
            store
                .put(run_key([9; 16], i), RUN_META, &[i as u8; 30_000])
                .unwrap();
        }
    }
    std::fs::remove_dir_all(state.join("index")).unwrap();
    let out = mountd()
        .arg("rebuild-index")
        .arg("--volume")
        .arg(&vol)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("20 shares"));
    let store = Store::open(
        UringVolume::open(&vol, &UringOptions::default()).unwrap(),
        &state,
        StoreOptions::default(),
    )
    .unwrap();
    for i in 0..20 {
        assert_eq!(
            store.get(&run_key([9; 16], i)).unwrap().bytes(),
            &[i as u8; 30_000][..]
        );
    }
}
