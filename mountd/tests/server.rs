//! Real `qgenome-mountd serve` processes: shares round-trip over sealed TCP and the Unix
//! socket, on a file volume and a loop device; SIGTERM exits 0 and everything is kept.

mod common;

use std::sync::Arc;

use common::{share_bytes, Daemon, LoopDevice, Site, Vol};
use qgenome::sites::{MountdSite, ShareKey, ShareMeta, ShareSite, SiteError};

const META: ShareMeta = ShareMeta {
    k: 2,
    n: 3,
    secret_len: 3 << 20,
};

fn key(file: u8, i: u64) -> ShareKey {
    let mut f = *b"server-test-file";
    f[0] = file;
    ShareKey {
        file: f,
        chunk: i / 3,
        share: (i % 3) as u8,
    }
}

fn len_of(i: u64) -> usize {
    [1usize, 4095, 65_537, 1 << 20, 300_001, 3 << 20][(i % 6) as usize]
}

/// `threads` threads each put `per` shares through `site`, then everything is read back.
fn round_trip(site: &Arc<dyn ShareSite>, file: u8, threads: u64, per: u64) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let site = site.clone();
            s.spawn(move || {
                for j in 0..per {
                    let i = t * per + j;
                    let k = key(file, i);
                    site.put(&k, &META, &share_bytes(7, &k, len_of(i))).unwrap();
                }
            });
        }
    });
    std::thread::scope(|s| {
        for t in 0..threads {
            let site = site.clone();
            s.spawn(move || {
                for j in 0..per {
                    let i = t * per + j;
                    let k = key(file, i);
                    let got = site.get(&k).unwrap();
                    assert!(got == share_bytes(7, &k, len_of(i)), "share {k} differs");
                }
            });
        }
    });
}

fn exercise(site: &Site, d: &mut Daemon) {
    let tcp = MountdSite::tcp(&site.name, &d.tcp, &site.client_keys("home-x")).unwrap();
    let key_before = tcp.key_remaining().unwrap();
    let tcp: Arc<dyn ShareSite> = Arc::new(tcp);
    let unix: Arc<dyn ShareSite> = Arc::new(d.unix_client(&site.name));
    assert_eq!(unix.key_remaining(), None);
    round_trip(&tcp, 1, 4, 15);
    round_trip(&unix, 2, 4, 15);
    // Each transport reads the other's shares.
    let k = key(1, 3);
    assert_eq!(unix.get(&k).unwrap(), share_bytes(7, &k, len_of(3)));
    let k = key(2, 5);
    assert_eq!(tcp.get(&k).unwrap(), share_bytes(7, &k, len_of(5)));
    let sent: u64 = (0..60).map(|i| len_of(i) as u64).sum();
    assert!(
        key_before - tcp.key_remaining().unwrap() >= sent,
        "key drawn for every byte sent"
    );
    // NotFound names the site and the key; delete; deleting twice is fine.
    let missing = key(9, 1);
    match tcp.get(&missing) {
        Err(SiteError::NotFound { site: s, key }) => {
            assert_eq!(s, site.name);
            assert_eq!(key, missing);
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    tcp.delete(&key(1, 0)).unwrap();
    tcp.delete(&key(1, 0)).unwrap();
    assert!(matches!(
        unix.get(&key(1, 0)),
        Err(SiteError::NotFound { .. })
    ));
    // LIST pages by file prefix, STAT reports shares and key left per link.
    let m = MountdSite::unix(&site.name, &d.socket);
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = m.list(&[2], after, 7).unwrap();
        assert!(page.len() <= 7);
        all.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(all.len(), 60, "file 2's shares");
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert!(all.iter().all(|e| e.key.file[0] == 2 && e.meta == META));
    let st = m.stat().unwrap();
    assert_eq!(st.site, site.name);
    assert_eq!(st.shares, 119);
    assert_eq!(st.links.len(), 1);
    assert_eq!(st.links[0].link, "home-x");
    assert!(
        st.links[0].recv_remaining <= (200 << 20) - sent && st.links[0].send_remaining < 200 << 20
    );
    drop((tcp, unix, m));
    // SIGTERM: exit 0; after a restart everything is still there.
    assert!(d.terminate().success(), "{}", d.log_text());
    let d2 = site.start();
    let tcp: Arc<dyn ShareSite> =
        Arc::new(MountdSite::tcp(&site.name, &d2.tcp, &site.client_keys("home-x")).unwrap());
    for i in 1..60 {
        let k = key(1, i);
        assert_eq!(tcp.get(&k).unwrap(), share_bytes(7, &k, len_of(i)));
    }
}

#[test]
fn shares_round_trip_over_sealed_tcp_and_unix_on_a_file_volume() {
    let site = Site::new(
        "site-file",
        Vol::File(512 << 20),
        &["home-x"],
        &["home-x"],
        200 << 20,
    );
    let mut d = site.start();
    exercise(&site, &mut d);
}

#[test]
fn shares_round_trip_over_sealed_tcp_and_unix_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let lo = LoopDevice::attach(&file);
    let site = Site::new(
        "site-loop",
        Vol::Device(&lo.dev),
        &["home-x"],
        &["home-x"],
        200 << 20,
    );
    let mut d = site.start();
    exercise(&site, &mut d);
    drop(d);
}

/// The length of the all-zero prefix of the key in pool file `path` (after its 4 KiB header),
/// in whole 4 KiB blocks; every block after it must be key (not all zeros).
fn destroyed_prefix(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let key = &bytes[4096..];
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let prefix = key.chunks(4096).take_while(|b| zero(b)).count();
    assert!(
        key.chunks(4096).skip(prefix).all(|b| !zero(b)),
        "{}: destroyed key past the used prefix",
        path.display()
    );
    (prefix * 4096) as u64
}

/// A flushed link (what a mount or a catalog rebuild does before it exits) leaves none of the
/// key its frames used on the client's disk: the destroyer holds a used range short of a
/// 2 MiB boundary back for a while to punch it with the next, and an exit cut that short.
#[test]
fn a_flushed_link_leaves_none_of_the_key_it_used_on_disk() {
    let site = Site::new(
        "s1",
        Vol::File(64 << 20),
        &["home-x"],
        &["home-x"],
        16 << 20,
    );
    let _d = site.start();
    let tcp = MountdSite::tcp(&site.name, &_d.tcp, &site.client_keys("home-x")).unwrap();
    let k = key(9, 0);
    let share = share_bytes(3, &k, 300_001);
    tcp.put(&k, &META, &share).unwrap();
    assert_eq!(tcp.get(&k).unwrap(), share);
    tcp.flush_link().unwrap();
    let dir = site.keys.path().join("client");
    let sent = destroyed_prefix(&dir.join("home-x.a2b.pool"));
    assert!(sent >= 300_001, "{sent} bytes of send key destroyed");
    let answered = destroyed_prefix(&dir.join("home-x.b2a.pool"));
    assert!(
        answered >= 300_001,
        "{answered} bytes of reply key destroyed"
    );
}
