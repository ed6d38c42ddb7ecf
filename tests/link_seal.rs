//! Sealing and opening frames through pool-backed streams: round trips, bit flips, replays,
//! foreign and malformed frames.
use std::path::{Path, PathBuf};

use qgenome::keys::{pool, Direction};
use qgenome::link::{LinkError, RecvStream, SendStream, StreamOptions};

struct Link {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn provision(name: &str, size: u64) -> Link {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    pool::provision(name, size, &a, &b).unwrap();
    Link { _dir: dir, a, b }
}

fn opts() -> StreamOptions {
    StreamOptions { window: 1 << 16 }
}

fn tx(dir: &Path, name: &str) -> SendStream {
    SendStream::from_dir(dir, name, Direction::AtoB, opts()).unwrap()
}

fn rx(dir: &Path, name: &str) -> RecvStream {
    RecvStream::from_dir(dir, name, Direction::AtoB, opts()).unwrap()
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

#[test]
fn round_trip_many_sizes_both_directions() {
    let l = provision("home-lsa", 8 << 20);
    let sizes = [
        0usize,
        1,
        15,
        16,
        17,
        31,
        32,
        33,
        100,
        127,
        128,
        129,
        4095,
        4096,
        65536,
        128 * 1024 - 1,
        128 * 1024,
        128 * 1024 + 1,
        (1 << 20) + 3,
    ];
    for (dir_s, dir_r, d) in [(&l.a, &l.b, Direction::AtoB), (&l.b, &l.a, Direction::BtoA)] {
        let mut s = SendStream::from_dir(dir_s, "home-lsa", d, opts()).unwrap();
        let mut r = RecvStream::from_dir(dir_r, "home-lsa", d, opts()).unwrap();
        let (mut f, mut o) = (Vec::new(), Vec::new());
        for (i, &n) in sizes.iter().enumerate() {
            let p = payload(n, i as u8);
            let before = s.remaining();
            let sealed = s.seal(&p, &mut f).unwrap();
            assert_eq!(f.len(), 40 + n + 16);
            assert_eq!(
                before - s.remaining(),
                qgenome::wire::frame::key_len_for(n as u64).unwrap(),
                "whole key blocks"
            );
            if n >= 16 {
                assert_ne!(&f[40..56], &p[..16], "payload must not travel in clear");
            }
            let opened = r.open(&f, &mut o).unwrap();
            assert_eq!(o, p, "size {n} {d}");
            assert_eq!(opened.key_range, sealed.key_range);
        }
        assert_eq!(s.remaining(), r.remaining());
    }
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let l = provision("flip", 1 << 20);
    let mut s = tx(&l.a, "flip");
    let p = payload(64, 7);
    let mut frame = Vec::new();
    s.seal(&p, &mut frame).unwrap();
    let mut out = Vec::new();
    let mut tag_failures = 0;
    for bit in 0..frame.len() * 8 {
        // A fresh receiver state for every flip.
        let mut r = rx(&l.b, "flip");
        let mut f = frame.clone();
        f[bit / 8] ^= 1 << (bit % 8);
        let err = r
            .open(&f, &mut out)
            .expect_err(&format!("bit {bit} accepted"));
        assert!(out.is_empty(), "bit {bit}: plaintext handed out");
        assert!(err.to_string().contains("\"flip\""), "{err}");
        if matches!(err, LinkError::BadTag { .. }) {
            tag_failures += 1;
        }
        if bit / 8 >= 40 {
            // Ciphertext and tag: only the tag can catch these.
            assert!(matches!(err, LinkError::BadTag { .. }), "bit {bit}: {err}");
        }
    }
    // Payload and tag bits, plus low key-offset bits that still point inside the pool.
    assert!(tag_failures > (64 + 16) * 8, "{tag_failures}");
    // None of the rejected frames burnt key: the genuine frame still opens.
    let mut r = rx(&l.b, "flip");
    r.open(&frame, &mut out).unwrap();
    assert_eq!(out, p);
}

#[test]
fn replay_is_rejected_also_after_receiver_restart() {
    let l = provision("replay", 1 << 20);
    let mut s = tx(&l.a, "replay");
    let mut r = rx(&l.b, "replay");
    let (mut f, mut o) = (Vec::new(), Vec::new());
    let mut frames = Vec::new();
    for i in 0..5 {
        s.seal(&payload(1000, i), &mut f).unwrap();
        r.open(&f, &mut o).unwrap();
        frames.push(f.clone());
    }
    for fr in &frames {
        let e = r.open(fr, &mut o).unwrap_err();
        assert!(matches!(e, LinkError::KeyAlreadyUsed { .. }), "{e}");
        assert!(e.to_string().contains("\"replay\""), "{e}");
        assert!(o.is_empty());
    }
    drop(r);
    let mut r = rx(&l.b, "replay");
    for fr in &frames {
        let e = r.open(fr, &mut o).unwrap_err();
        assert!(matches!(e, LinkError::KeyAlreadyUsed { .. }), "{e}");
    }
    // A frame sealed before the restart but never delivered lies below the persisted
    // window: rejected with the offset to skip to, and the sender can skip and resend.
    s.seal(&payload(10, 1), &mut f).unwrap();
    let e = r.open(&f, &mut o).unwrap_err();
    let LinkError::KeyAlreadyUsed { consumed_until, .. } = e else {
        panic!("{e}")
    };
    drop(r);
    let mut r = rx(&l.b, "replay");
    assert!(matches!(
        r.open(&f, &mut o),
        Err(LinkError::KeyAlreadyUsed { .. })
    ));
    s.skip_to(consumed_until).unwrap();
    assert!(matches!(s.skip_to(0), Err(LinkError::SkipBackwards { .. })));
    s.seal(&payload(10, 1), &mut f).unwrap();
    r.open(&f, &mut o).unwrap();
    assert_eq!(o, payload(10, 1));
}

#[test]
fn frames_of_another_link_or_direction_are_rejected() {
    let l1 = provision("one", 1 << 20);
    let l2 = provision("two", 1 << 20);
    let (mut f, mut o) = (Vec::new(), Vec::new());
    tx(&l2.a, "two").seal(b"hello", &mut f).unwrap();
    let e = rx(&l1.b, "one").open(&f, &mut o).unwrap_err();
    assert!(matches!(e, LinkError::WrongStream { .. }), "{e}");
    assert!(e.to_string().contains("\"one\""), "{e}");
    // The other direction of the same link has its own stream id.
    SendStream::from_dir(&l1.b, "one", Direction::BtoA, opts())
        .unwrap()
        .seal(b"hello", &mut f)
        .unwrap();
    let e = rx(&l1.b, "one").open(&f, &mut o).unwrap_err();
    assert!(matches!(e, LinkError::WrongStream { .. }), "{e}");
}

#[test]
fn truncated_and_absurd_frames_are_rejected() {
    let l = provision("trunc", 1 << 20);
    let mut s = tx(&l.a, "trunc");
    let mut r = rx(&l.b, "trunc");
    let (mut f, mut o) = (Vec::new(), Vec::new());
    s.seal(&payload(300, 3), &mut f).unwrap();
    for cut in [0, 1, 39, 40, 55, 56, 100, f.len() - 1] {
        let e = r.open(&f[..cut], &mut o).unwrap_err();
        assert!(matches!(e, LinkError::BadFrame { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("\"trunc\""), "{e}");
    }
    let mut longer = f.clone();
    longer.push(0);
    assert!(matches!(
        r.open(&longer, &mut o),
        Err(LinkError::BadFrame { .. })
    ));
    let mut absurd = f.clone();
    absurd[32..40].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = r.open(&absurd, &mut o).unwrap_err();
    assert!(matches!(e, LinkError::BadFrame { .. }), "{e}");
    // Declared length consistent with the bytes, but key range beyond the pool.
    let mut beyond = f.clone();
    beyond[24..32].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let e = r.open(&beyond, &mut o).unwrap_err();
    assert!(matches!(e, LinkError::OutsidePool { .. }), "{e}");
    assert!(e.to_string().contains("trunc.a2b.pool"), "{e}");
    r.open(&f, &mut o).unwrap();
    assert_eq!(o, payload(300, 3));
}

#[test]
fn debug_output_shows_no_key_or_payload() {
    let l = provision("dbg", 1 << 16);
    let s = tx(&l.a, "dbg");
    let r = rx(&l.b, "dbg");
    let d = format!("{s:?} {r:?}");
    assert!(d.contains("dbg.a2b.pool"), "{d}");
    assert!(d.len() < 400, "{d}");
}
