//! Properties of the XOR (k,n) scheme, driven through the real byte kernels.
use proptest::prelude::*;
use qgenome::sharing::{k_subsets, Drbg, RandomError, RandomSource, Scheme, SharingError};

/// The (k,n) schemes the issue names: all 2 <= k <= n <= 7, plus (3,11) and (5,16).
fn schemes() -> Vec<(usize, usize)> {
    let mut v: Vec<_> = (2..=7).flat_map(|n| (2..=n).map(move |k| (k, n))).collect();
    v.extend([(3, 11), (5, 16)]);
    v
}

fn split(scheme: &Scheme, secret: &[u8]) -> Vec<Vec<u8>> {
    let mut shares = vec![vec![0u8; scheme.share_len(secret.len())]; scheme.n()];
    let mut refs: Vec<&mut [u8]> = shares.iter_mut().map(Vec::as_mut_slice).collect();
    scheme
        .split(secret, &mut Drbg::from_os().unwrap(), &mut refs)
        .unwrap();
    shares
}

/// Combine, checking on the way that the observer of `combine_observed` is shown the secret
/// whole and in order (it is what the read path hashes).
fn combine(scheme: &Scheme, shares: &[Vec<u8>], subset: &[usize], len: usize) -> Vec<u8> {
    let given: Vec<(usize, &[u8])> = subset.iter().map(|&i| (i, shares[i].as_slice())).collect();
    let mut out = vec![0u8; len];
    let mut seen = Vec::new();
    scheme
        .combine_observed(&given, len, &mut out, &mut |t| seen.extend_from_slice(t))
        .unwrap();
    assert_eq!(seen, out, "observed tiles are the secret, in order");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// Every k-subset, in any order, rebuilds random secrets of odd and even lengths, including
    /// lengths that need padding and lengths spanning several tiles.
    #[test]
    fn every_k_subset_rebuilds_the_secret(
        len in prop_oneof![1usize..300, 8000usize..20000],
        odd in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let len = if odd { len | 1 } else { len & !1 }.max(2);
        let secret: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 17) as u8).collect();
        for (k, n) in schemes() {
            // (3,11) and (5,16) have 165 and 4368 subsets: keep their secrets short (still odd
            // or even, still padded) so the test stays in seconds.
            let secret = if n > 7 { &secret[..len.min(1500 + len % 2)] } else { &secret[..] };
            let len = secret.len();
            let scheme = Scheme::new(k, n).unwrap();
            let shares = split(&scheme, secret);
            for mut subset in k_subsets(n, k) {
                prop_assert_eq!(&combine(&scheme, &shares, &subset, len), secret, "({},{}) {:?}", k, n, subset);
                subset.reverse();
                prop_assert_eq!(&combine(&scheme, &shares, &subset, len), secret, "({},{}) {:?}", k, n, subset);
            }
        }
    }

    /// Regeneration of any lost share from any k others is bit-for-bit.
    #[test]
    fn a_lost_share_regenerates_bit_for_bit(len in 1usize..5000, seed in any::<u64>()) {
        let secret: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 3) >> 11) as u8).collect();
        for (k, n) in schemes() {
            let scheme = Scheme::new(k, n).unwrap();
            let shares = split(&scheme, &secret);
            // Regeneration needs k shares other than the lost one: impossible when k = n.
            for lost in (0..n).filter(|_| k < n) {
                let others: Vec<usize> = (0..n).filter(|&i| i != lost).collect();
                // Rotate through the other shares so that different subsets are exercised.
                let start = (seed as usize).wrapping_add(lost) % others.len();
                let subset: Vec<usize> = (0..k).map(|t| others[(start + t) % others.len()]).collect();
                let given: Vec<(usize, &[u8])> = subset.iter().map(|&i| (i, shares[i].as_slice())).collect();
                let mut out = vec![0u8; shares[lost].len()];
                scheme.regenerate(lost, &given, &mut out).unwrap();
                prop_assert_eq!(&out, &shares[lost], "({},{}) lost {} from {:?}", k, n, lost, subset);
            }
        }
    }
}

#[test]
fn refreshed_shares_rebuild_the_secret_and_differ_from_the_old_ones() {
    let secret: Vec<u8> = (0..10_001u32).map(|i| (i * 7 + 3) as u8).collect();
    for (k, n) in schemes() {
        let scheme = Scheme::new(k, n).unwrap();
        let old = split(&scheme, &secret);
        let mut new = old.clone();
        let mut refs: Vec<&mut [u8]> = new.iter_mut().map(Vec::as_mut_slice).collect();
        scheme
            .refresh(&mut refs, &mut Drbg::from_os().unwrap())
            .unwrap();
        for i in 0..n {
            assert_ne!(old[i], new[i], "({k},{n}) share {i} unchanged by refresh");
        }
        for subset in k_subsets(n, k) {
            assert_eq!(
                combine(&scheme, &new, &subset, secret.len()),
                secret,
                "({k},{n}) {subset:?}"
            );
        }
        // An old share mixed with new ones no longer rebuilds the secret.
        let mut mixed = new.clone();
        mixed[0] = old[0].clone();
        let subset: Vec<usize> = (0..k).collect();
        assert_ne!(combine(&scheme, &mixed, &subset, secret.len()), secret);
    }
}

/// A random source that replays prepared bytes, so a test controls every random piece.
struct Prepared<'a>(&'a [u8]);

impl RandomSource for Prepared<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomError> {
        let (head, tail) = self.0.split_at(buf.len());
        buf.copy_from_slice(head);
        self.0 = tail;
        Ok(())
    }
}

/// Exhaustive secrecy check on 1-bit pieces for every (k,n) with n <= 5: for every (k-1)-subset
/// of shares, the distribution of the subset's bits over all random inputs is the same for every
/// secret. Each bit of the 64-byte pieces is an independent 1-bit instance of the scheme (XOR
/// works bitwise), so one split evaluates 512 (secret, randomness) pairs through the real kernel.
#[test]
fn any_k_minus_1_shares_are_independent_of_the_secret() {
    const LANES: usize = 512;
    for n in 2..=5usize {
        for k in 2..=n {
            let scheme = Scheme::new(k, n).unwrap();
            let pieces = scheme.p() - 1;
            let secret_len = pieces * 64;
            assert_eq!(scheme.piece_len(secret_len), 64);
            let randoms = scheme.random_len(secret_len) / 64;
            let secret_bits = pieces;
            let total: u64 = 1 << (secret_bits + randoms);
            let subsets = k_subsets(n, k - 1);
            let bits_per_subset = (k - 1) * pieces;
            // counts[subset][secret][observed bits]
            let mut counts =
                vec![vec![vec![0u32; 1 << bits_per_subset]; 1 << secret_bits]; subsets.len()];
            let mut secret = vec![0u8; secret_len];
            let mut random = vec![0u8; randoms * 64];
            let mut shares = vec![vec![0u8; secret_len]; n];
            for base in (0..total).step_by(LANES) {
                secret.fill(0);
                random.fill(0);
                let lanes = LANES.min((total - base) as usize);
                for lane in 0..lanes {
                    let inst = base + lane as u64;
                    let (byte, bit) = (lane / 8, lane % 8);
                    for m in 0..pieces {
                        secret[m * 64 + byte] |= ((inst >> m & 1) as u8) << bit;
                    }
                    let rv = inst >> secret_bits;
                    for q in 0..randoms {
                        random[q * 64 + byte] |= ((rv >> q & 1) as u8) << bit;
                    }
                }
                let mut refs: Vec<&mut [u8]> = shares.iter_mut().map(Vec::as_mut_slice).collect();
                scheme
                    .split(&secret, &mut Prepared(&random), &mut refs)
                    .unwrap();
                for lane in 0..lanes {
                    let inst = base + lane as u64;
                    let sv = (inst & ((1 << secret_bits) - 1)) as usize;
                    let (byte, bit) = (lane / 8, lane % 8);
                    for (s, subset) in subsets.iter().enumerate() {
                        let mut seen = 0usize;
                        for (pos, &i) in subset.iter().enumerate() {
                            for j in 0..pieces {
                                let b = shares[i][j * 64 + byte] >> bit & 1;
                                seen |= (b as usize) << (pos * pieces + j);
                            }
                        }
                        counts[s][sv][seen] += 1;
                    }
                }
            }
            for (s, subset) in subsets.iter().enumerate() {
                for sv in 1..1 << secret_bits {
                    assert_eq!(
                        counts[s][sv], counts[s][0],
                        "({k},{n}): shares {subset:?} distinguish secret {sv:b} from 0"
                    );
                }
            }
        }
    }
}

#[test]
fn parallel_chunk_split_matches_per_chunk_combine() {
    let scheme = Scheme::new(2, 3).unwrap();
    let data: Vec<u8> = (0..1_000_003u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    let chunk = 65_536;
    let lens: Vec<usize> = data
        .chunks(chunk)
        .map(|c| scheme.share_len(c.len()))
        .collect();
    let total: usize = lens.iter().sum();
    let mut shares = vec![vec![0u8; total]; 3];
    let mut refs: Vec<&mut [u8]> = shares.iter_mut().map(Vec::as_mut_slice).collect();
    scheme.split_chunks(&data, chunk, &mut refs).unwrap();
    let mut off = 0;
    for (c, piece) in data.chunks(chunk).enumerate() {
        let given = [
            (2, &shares[2][off..off + lens[c]]),
            (0, &shares[0][off..off + lens[c]]),
        ];
        let mut out = vec![0u8; piece.len()];
        scheme.combine(&given, piece.len(), &mut out).unwrap();
        assert_eq!(out, piece, "chunk {c}");
        off += lens[c];
    }
}

#[test]
fn bad_input_is_refused_with_a_named_error() {
    assert!(matches!(
        Scheme::new(1, 3),
        Err(SharingError::Parameters { k: 1, n: 3 })
    ));
    assert!(matches!(
        Scheme::new(4, 3),
        Err(SharingError::Parameters { .. })
    ));
    assert!(matches!(
        Scheme::new(2, 17),
        Err(SharingError::Parameters { .. })
    ));
    let scheme = Scheme::new(2, 3).unwrap();
    let secret = vec![7u8; 1000];
    let shares = split(&scheme, &secret);
    let mut out = vec![0u8; 1000];
    let err = scheme
        .combine(&[(0, &shares[0])], 1000, &mut out)
        .unwrap_err();
    assert!(
        matches!(err, SharingError::TooFewShares { have: 1, need: 2 }),
        "{err}"
    );
    let err = scheme
        .combine(&[(1, &shares[1]), (1, &shares[1])], 1000, &mut out)
        .unwrap_err();
    assert!(
        matches!(err, SharingError::DuplicateShare { index: 1 }),
        "{err}"
    );
    let err = scheme
        .combine(&[(0, &shares[0]), (5, &shares[1])], 1000, &mut out)
        .unwrap_err();
    assert!(
        matches!(err, SharingError::ShareIndex { index: 5, n: 3 }),
        "{err}"
    );
    let err = scheme
        .combine(&[(0, &shares[0]), (1, &shares[1][1..])], 1000, &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("share 1"), "{err}");
    let mut short = vec![0u8; 10];
    let mut refs: Vec<&mut [u8]> = vec![&mut short];
    let err = scheme
        .split(&secret, &mut Drbg::from_os().unwrap(), &mut refs)
        .unwrap_err();
    assert!(
        matches!(
            err,
            SharingError::ShareCount {
                expected: 3,
                actual: 1
            }
        ),
        "{err}"
    );
    assert_eq!(out, vec![0u8; 1000], "a refused combine wrote output");
}
