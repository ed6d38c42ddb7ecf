//! The command line: format creates a volume, scrub finds a byte changed behind the store's back.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;

use qgenome_mountd::bench::{pattern, run_key, RUN_META};
use qgenome_mountd::store::{Store, StoreOptions};
use qgenome_mountd::volume::{UringOptions, UringVolume};

fn mountd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qgenome-mountd"))
}

/// A new 64 MiB file volume at `vol` for `site`, formatted by the command line; its output.
fn format(vol: &std::path::Path, site: &str) -> std::process::Output {
    let out = mountd()
        .args(["format", "--site", site, "--size", "64M", "--volume"])
        .arg(vol)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn format_then_scrub_detects_a_changed_byte_by_file_and_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("site.vol");
    let out = format(&vol, "osaka-2");
    assert!(String::from_utf8_lossy(&out.stdout).contains("osaka-2"));
    // Formatting again without --force refuses to drop the index.
    let again = mountd()
        .args(["format", "--site", "x", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // Nor does it take a damaged superblock for none: one byte of it changed (its site
    // name), with the index gone, is still refused without --force.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        let sb = std::fs::read(&vol).unwrap()[..4096].to_vec();
        let at = sb.windows(7).position(|w| w == b"osaka-2").unwrap();
        f.write_all_at(b"O", at as u64).unwrap();
    }
    let index = dir.path().join("site.vol.state").join("index");
    std::fs::rename(&index, dir.path().join("index.kept")).unwrap();
    let damaged = mountd()
        .args(["format", "--site", "x", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&damaged.stderr);
    assert!(
        !damaged.status.success() && err.contains("checksum") && err.contains("--force"),
        "a damaged superblock was formatted over: {err}"
    );
    {
        let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        let sb = std::fs::read(&vol).unwrap()[..4096].to_vec();
        let at = sb.windows(7).position(|w| w == b"Osaka-2").unwrap();
        f.write_all_at(b"o", at as u64).unwrap();
    }
    std::fs::rename(dir.path().join("index.kept"), &index).unwrap();

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
        // While the index is in use (a serving daemon, here this store), neither a rebuild
        // nor a format may run under it; nor with an index directory of their own, since the
        // volume itself is held. Refused on the index directory or the volume, whichever the
        // command takes first.
        let other = dir.path().join("other.state");
        for state_arg in [None, Some(&other)] {
            for args in [
                &["rebuild-index"][..],
                &["format", "--site", "s", "--force"],
            ] {
                let mut cmd = mountd();
                cmd.args(args).arg("--volume").arg(&vol);
                if let Some(s) = state_arg {
                    cmd.arg("--state").arg(s);
                }
                let out = cmd.output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{args:?} ran beside the open store");
                let want = match state_arg {
                    None => "in use",
                    Some(_) => "in use by another process",
                };
                assert!(err.contains(want) && err.contains("r.vol"), "{err}");
            }
        }
        assert!(state.join("index").exists());
    }
    // A volume holding shares is formatted only with --force, whatever index directory is
    // named (here a new one, which the index check alone let through); and --size does not
    // pretend to resize an existing volume.
    for (args, want) in [
        (&["format", "--site", "t"][..], "holds shares of site s"),
        (
            &["format", "--site", "t", "--size", "64M", "--force"],
            "exists with 33554432 bytes",
        ),
    ] {
        let out = mountd()
            .args(args)
            .arg("--volume")
            .arg(&vol)
            .arg("--state")
            .arg(dir.path().join("fresh.state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} formatted a volume holding shares"
        );
        assert!(
            err.contains(want) && err.contains("r.vol"),
            "{args:?}: {err}"
        );
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

/// The JSON report on the last line of a command that succeeded.
fn json_report(out: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a report on stdout");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

/// `bench` through the daemon: each phase in rounds, fio over the same bytes beside each round,
/// and nothing left behind (volume, index, fio's file, key pools).
#[test]
fn bench_measures_rounds_beside_fio_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("bench.vol");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let out = mountd()
        .args([
            "bench", "--size", "16M", "--rounds", "2", "--json", "--volume",
        ])
        .arg(&vol)
        .arg("--key-dir")
        .arg(&keys)
        .output()
        .unwrap();
    let j = json_report(&out);
    assert_eq!(j["path"], "daemon-tcp-sealed");
    // Four at the volume (the store's share writes at once, and fio's iodepth), eight
    // connections putting.
    assert_eq!(
        (j["jobs"].as_u64(), j["write_depth"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(j["connections"].as_u64(), Some(8), "{j}");
    // The mode the volume uses: the default, RWF_DSYNC, whatever the filesystem (a write
    // waits for no flush of others).
    let on_tmpfs = qgenome::keys::tmpfs::is_tmpfs(dir.path());
    assert_eq!(j["durability"], "rwf-dsync");
    for key in [
        "put_mbps",
        "get_mbps",
        "fio_write_mbps",
        "fio_read_mbps",
        "fio_write_dsync_mbps",
        "put_vs_fio_write",
        "put_vs_fio_write_dsync",
        "get_vs_fio_read",
    ] {
        assert!(j[key].as_f64().unwrap() > 0.0, "{key} in {j}");
    }
    let rounds = j["rounds"].as_array().unwrap();
    let phases: Vec<&str> = rounds
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["put", "put", "get", "get"]);
    for phase in ["put", "get"] {
        let shares: u64 = rounds
            .iter()
            .filter(|r| r["phase"] == phase)
            .map(|r| r["shares"].as_u64().unwrap())
            .sum();
        assert_eq!(shares, 16, "{phase} rounds cover every share once");
    }
    assert!(rounds.iter().all(|r| r["fio_mbps"].as_f64().unwrap() > 0.0));
    put_latency_adds_up(&j, true, false);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keys"], "the bench left files behind");
    assert_eq!(std::fs::read_dir(&keys).unwrap().count(), 0);

    // A key directory that cannot be used: the error names it, and the volume, its index and
    // fio's file made before the failure are gone too.
    let not_a_dir = dir.path().join("keys-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let out = mountd()
        .args([
            "bench", "--size", "4M", "--rounds", "1", "--json", "--volume",
        ])
        .arg(&vol)
        .arg("--key-dir")
        .arg(&not_a_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--key-dir") && stderr.contains("keys-file"),
        "{stderr}"
    );
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["keys", "keys-file"],
        "a failed bench left files behind"
    );

    // The store directly, without fio: no baseline keys, the same rounds. With the group
    // fdatasync, which a volume on a disk uses when asked (on tmpfs: RWF_DSYNC), so that a
    // write's wait for the flush is measured too.
    let out = mountd()
        .args([
            "bench", "--direct", "--no-fio", "--size", "8M", "--rounds", "3",
        ])
        .args(["--durability", "fdatasync", "--json", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    let j = json_report(&out);
    assert_eq!(j["path"], "store-direct");
    assert!(j.get("connections").is_none() && j["write_depth"] == 4);
    assert!(j.get("fio_write_mbps").is_none(), "{j}");
    assert_eq!(j["rounds"].as_array().unwrap().len(), 6);
    assert_eq!(
        j["durability"],
        if on_tmpfs { "rwf-dsync" } else { "fdatasync" }
    );
    put_latency_adds_up(&j, false, !on_tmpfs);
    // Connections are the daemon's: with the store alone the option is refused, by name.
    let out = mountd()
        .args(["bench", "--direct", "--connections", "3", "--volume"])
        .arg(&vol)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--connections"),
        "{stderr}"
    );
}

/// The report's account of a put's time (`put_latency_us`): every part measured, and the
/// parts nest as they happen (the link's and the store's inside the client's put, the
/// volume's write and flush wait inside the store's).
fn put_latency_adds_up(j: &serde_json::Value, daemon: bool, flushes: bool) {
    let l = &j["put_latency_us"];
    let us = |k: &str| {
        l[k].as_f64()
            .unwrap_or_else(|| panic!("put_latency_us.{k} in {j}"))
    };
    for k in ["put", "store", "volume_write"] {
        assert!(us(k) > 0.0, "{k} in {l}");
    }
    // A volume on a disk waits for the group fdatasync; on tmpfs the write is all there is.
    assert_eq!(us("flush_wait") > 0.0, flushes, "{l}");
    // Reported (a put may find a place among the volume's writes at once: no wait).
    assert!(us("write_queue") >= 0.0, "{l}");
    assert!(
        us("store") >= us("write_queue") + us("volume_write") + us("flush_wait"),
        "{l}"
    );
    // Each group fdatasync covers at least one durable write: a put's, or the superblock's
    // when the first put tags the volume (on tmpfs there are none).
    let puts = j["shares"].as_f64().unwrap();
    let syncs = us("syncs_per_put");
    match flushes {
        true => assert!(syncs > 0.0 && (syncs * puts).round() <= puts + 1.0, "{l}"),
        false => assert_eq!(syncs, 0.0, "{l}"),
    }
    if daemon {
        assert!(us("link_open") > 0.0 && us("to_thread") > 0.0, "{l}");
        assert!(
            us("put") >= us("link_open") + us("to_thread") + us("store"),
            "{l}"
        );
    } else {
        assert!(
            l.get("link_open").is_none() && l.get("to_thread").is_none(),
            "{l}"
        );
        assert!(us("put") >= us("store"), "{l}");
    }
}

/// A file volume on /dev/shm (a tmpfs) is a file, not a device: `bench` needs no `--state`
/// for it, its volume keeps RWF_DSYNC (nothing to flush), and it leaves nothing behind.
#[test]
fn bench_takes_a_file_volume_on_dev_shm_as_a_file() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let vol = dir.path().join("bench.vol");
    let out = mountd()
        .args([
            "bench", "--size", "16M", "--rounds", "1", "--no-fio", "--json",
        ])
        .arg("--volume")
        .arg(&vol)
        .arg("--key-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let j = json_report(&out);
    assert_eq!(j["durability"], "rwf-dsync", "{j}");
    put_latency_adds_up(&j, true, false);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `format` and `bench` never cost what they did not make: a file holding data is not
/// formatted over without `--force`, a format that fails keeps the index it found and leaves
/// nothing it created, and a bench keeps an existing `--state` and fio file.
#[test]
fn format_and_bench_keep_what_they_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = mountd()
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // A file holding data, named by mistake.
    let precious = dir.path().join("precious.dat");
    let mut data = vec![0u8; 4 << 20];
    getrandom::getrandom(&mut data).unwrap();
    data[..4096].fill(0);
    std::fs::write(&precious, &data).unwrap();
    let (ok, err) = run(&["format", "--site", "x", "--volume", "precious.dat"]);
    assert!(
        !ok && err.contains("precious.dat") && err.contains("not blank") && err.contains("--force"),
        "formatted over a file holding data: {err}"
    );
    assert!(
        std::fs::read(&precious).unwrap() == data,
        "precious.dat changed"
    );
    assert!(!dir.path().join("precious.dat.state").exists());
    let (ok, err) = run(&[
        "format",
        "--site",
        "x",
        "--force",
        "--volume",
        "precious.dat",
    ]);
    assert!(ok, "{err}");

    // A new volume whose format fails leaves neither the file nor the state directory.
    let (ok, err) = run(&[
        "format",
        "--site",
        "",
        "--size",
        "64M",
        "--volume",
        "fresh.vol",
    ]);
    assert!(!ok && err.contains("site"), "{err}");
    assert!(
        !dir.path().join("fresh.vol").exists(),
        "fresh.vol left behind"
    );
    assert!(!dir.path().join("fresh.vol.state").exists());

    // A dangling symlink named as the volume is not taken for something format made.
    std::os::unix::fs::symlink("/nonexistent/target", dir.path().join("link.vol")).unwrap();
    let (ok, err) = run(&[
        "format", "--site", "x", "--size", "64M", "--volume", "link.vol",
    ]);
    assert!(!ok, "{err}");
    assert!(
        std::fs::symlink_metadata(dir.path().join("link.vol")).is_ok(),
        "the symlink was removed: {err}"
    );

    // `--force` with a bad argument fails before the index goes.
    let (ok, err) = run(&[
        "format", "--site", "a", "--size", "64M", "--volume", "good.vol",
    ]);
    assert!(ok, "{err}");
    let (ok, err) = run(&["format", "--site", "", "--force", "--volume", "good.vol"]);
    assert!(!ok && err.contains("site"), "{err}");
    assert!(
        dir.path().join("good.vol.state/index").exists(),
        "index discarded"
    );
    let stat = mountd()
        .args(["stat", "--volume"])
        .arg(dir.path().join("good.vol"))
        .output()
        .unwrap();
    assert!(
        stat.status.success(),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(v["site"], "a");

    // A bench on a new volume keeps an existing --state and an existing fio file.
    let state = dir.path().join("other.state");
    std::fs::create_dir_all(state.join("index")).unwrap();
    std::fs::write(state.join("keep"), b"kept").unwrap();
    let (ok, err) = run(&[
        "bench",
        "--size",
        "1M",
        "--rounds",
        "1",
        "--no-fio",
        "--direct",
        "--volume",
        "b.vol",
        "--state",
        "other.state",
    ]);
    assert!(!ok && err.contains("other.state"), "{err}");
    assert_eq!(std::fs::read(state.join("keep")).unwrap(), b"kept");
    assert!(state.join("index").exists());
    assert!(!dir.path().join("b.vol").exists());
    std::fs::write(dir.path().join("c.vol.fio"), b"mine").unwrap();
    let (ok, err) = run(&[
        "bench", "--size", "1M", "--rounds", "1", "--direct", "--volume", "c.vol",
    ]);
    assert!(!ok && err.contains("c.vol.fio"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("c.vol.fio")).unwrap(),
        b"mine"
    );
    assert!(!dir.path().join("c.vol").exists());
    // A share size of 0 is named (it divided by zero: a panic).
    let (ok, err) = run(&[
        "bench",
        "--size",
        "1M",
        "--share-size",
        "0",
        "--volume",
        "d.vol",
    ]);
    assert!(
        !ok && err.contains("--share-size") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dir.path().join("d.vol").exists());
}

/// A bench on a site's own volume that fails (here: fio cannot be run, after the first round
/// of puts) leaves none of its shares behind: they would stay indexed for good, under a file
/// id no catalog knows, taking the site's space.
#[test]
fn a_failed_bench_on_an_existing_volume_leaves_no_share_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("site.vol");
    format(&vol, "s");
    let out = mountd()
        .args([
            "bench", "--direct", "--size", "8M", "--rounds", "2", "--volume",
        ])
        .arg(&vol)
        .env("PATH", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("fio"), "{stderr}");
    let store = Store::open(
        UringVolume::open(&vol, &UringOptions::default()).unwrap(),
        &dir.path().join("site.vol.state"),
        StoreOptions::default(),
    )
    .unwrap();
    let left = store.list().count();
    assert_eq!(left, 0, "shares left by the failed bench");
}

/// `rebuild-index` with the `--state` of another site (a mistyped path) is refused, naming
/// both volumes, and that site's index is left where it is: moved aside, it left that site
/// refusing to start.
#[test]
fn rebuild_index_into_another_volumes_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.vol"), dir.path().join("b.vol"));
    format(&a, "a");
    format(&b, "b");
    let a_state = dir.path().join("a.vol.state");
    {
        let store = Store::open(
            UringVolume::open(&a, &UringOptions::default()).unwrap(),
            &a_state,
            StoreOptions::default(),
        )
        .unwrap();
        store
            .put(run_key([3; 16], 0), RUN_META, &[7u8; 5000])
            .unwrap();
    }
    let out = mountd()
        .args(["rebuild-index", "--volume"])
        .arg(&b)
        .arg("--state")
        .arg(&a_state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rebuilt b's index into a's state");
    assert!(
        err.contains("a.vol.state") && err.contains("b.vol"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&a_state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("index.old"))
        .collect();
    assert!(left.is_empty(), "a's index moved aside: {left:?}");
    // Nor does `format --force` of another volume (formatted or new) discard a's index: it
    // discards only the index of the volume it formats.
    let c = dir.path().join("c.vol");
    for (vol, size) in [(&b, None), (&c, Some("64M"))] {
        let mut cmd = mountd();
        cmd.args(["format", "--site", "z", "--force", "--volume"])
            .arg(vol)
            .arg("--state")
            .arg(&a_state);
        if let Some(size) = size {
            cmd.args(["--size", size]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{}: discarded a's index",
            vol.display()
        );
        assert!(
            err.contains("a.vol.state")
                && err.contains("belongs to volume")
                && err.contains("check --state"),
            "{err}"
        );
    }
    let store = Store::open(
        UringVolume::open(&a, &UringOptions::default()).unwrap(),
        &a_state,
        StoreOptions::default(),
    )
    .unwrap();
    assert_eq!(store.list().count(), 1, "site a lost its index");
    drop(store);
    // Its own volume's index it does discard, with --force.
    let out = mountd()
        .args(["format", "--site", "a", "--force", "--volume"])
        .arg(&a)
        .arg("--state")
        .arg(&a_state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `serve` with a config that gives it nothing to serve on is refused at once, naming the
/// file and the keys.
#[test]
fn serve_refuses_a_config_that_listens_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("site.toml");
    std::fs::write(
        &cfg,
        format!(
            "site = \"s\"\nvolume = {:?}\nstate_dir = {:?}\n",
            dir.path().join("vol"),
            dir.path().join("state")
        ),
    )
    .unwrap();
    let out = mountd()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(cfg.to_str().unwrap()) && e.contains("`listen`") && e.contains("`unix_socket`"),
        "{e}"
    );
}

/// A volume of a build before index tags holds shares under a superblock whose tag is 0
/// (the store tags it at its first open): `format` without `--force` keeps it.
#[test]
fn format_keeps_a_volume_whose_untagged_superblock_fronts_shares() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("old.vol");
    format(&vol, "old");
    let k = run_key([4; 16], 0);
    {
        let dev = UringVolume::open(&vol, &UringOptions::default()).unwrap();
        let s = Store::open(
            dev,
            &dir.path().join("old.vol.state"),
            StoreOptions::default(),
        )
        .unwrap();
        let mut data = vec![0u8; 100_000];
        pattern(1, &k, &mut data);
        s.put(k, RUN_META, &data).unwrap();
    }
    // As the older build left it: the same superblock, no tag.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vol)
        .unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 0).unwrap();
    let mut sb = qgenome_mountd::layout::Superblock::decode(&b).unwrap();
    sb.index_tag = 0;
    let enc = sb.encode();
    f.write_all_at(&enc, 0).unwrap();
    f.sync_all().unwrap();
    let before = std::fs::read(&vol).unwrap();
    let out = mountd()
        .args(["format", "--site", "new", "--volume"])
        .arg(&vol)
        .arg("--state")
        .arg(dir.path().join("elsewhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("not blank past its superblock")
            && err.contains("--force"),
        "{err}"
    );
    assert!(std::fs::read(&vol).unwrap() == before, "the volume changed");
}
