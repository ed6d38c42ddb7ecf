//! XOR kernels: the only arithmetic the sharing scheme needs.
//!
//! Each kernel is written once as a plain loop that LLVM vectorises, and compiled three times:
//! for AVX-512, for AVX2 and for the baseline target. The widest one the CPU supports is picked
//! at run time (`is_x86_feature_detected!` caches its answer, so the check costs one load).
//! Callers hand in tiles small enough to stay in L1, so several passes over a tile are cheap.

/// `multiversion! { [pub] fn name(args) { body } }`: the body compiled for AVX-512, AVX2 and the
/// baseline, the widest the CPU has picked at run time. Also used by the DRBG's counter blocks.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        #[inline]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU supports the features this copy was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `dst ^= a`. Panics if the lengths differ.
    pub fn xor_into(dst: &mut [u8], a: &[u8]) {
        assert_eq!(dst.len(), a.len(), "xor_into: length mismatch");
        for (d, x) in dst.iter_mut().zip(a) {
            *d ^= *x;
        }
    }
}

multiversion! {
    /// `dst ^= a ^ b`. Panics if the lengths differ.
    pub fn xor_into2(dst: &mut [u8], a: &[u8], b: &[u8]) {
        assert!(dst.len() == a.len() && dst.len() == b.len(), "xor_into2: length mismatch");
        for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
            *d ^= *x ^ *y;
        }
    }
}

multiversion! {
    /// `dst = a ^ b`. Panics if the lengths differ.
    pub fn xor2(dst: &mut [u8], a: &[u8], b: &[u8]) {
        assert!(dst.len() == a.len() && dst.len() == b.len(), "xor2: length mismatch");
        for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
            *d = *x ^ *y;
        }
    }
}

/// `dst = XOR of all sources` (or `dst ^= XOR of all sources` when `accumulate`), reading each
/// source once and writing `dst` as few times as the kernels allow. An empty source list sets
/// `dst` to zero (or leaves it, when accumulating).
pub fn xor_sources(dst: &mut [u8], sources: &[&[u8]], accumulate: bool) {
    let mut rest = sources;
    if !accumulate {
        match rest {
            [] => return dst.fill(0),
            [a] => return dst.copy_from_slice(a),
            [a, b, tail @ ..] => {
                xor2(dst, a, b);
                rest = tail;
            }
        }
    }
    let mut pairs = rest.chunks_exact(2);
    for pair in &mut pairs {
        xor_into2(dst, pair[0], pair[1]);
    }
    if let [a] = pairs.remainder() {
        xor_into(dst, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model(sources: &[Vec<u8>], init: &[u8], accumulate: bool) -> Vec<u8> {
        let mut out = if accumulate {
            init.to_vec()
        } else {
            vec![0; init.len()]
        };
        for s in sources {
            for (o, x) in out.iter_mut().zip(s) {
                *o ^= x;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn xor_sources_matches_bytewise_model(
            len in 0usize..300,
            count in 0usize..7,
            seed in any::<u64>(),
            accumulate in any::<bool>(),
        ) {
            let byte = |i: usize, s: usize| (seed.wrapping_mul(i as u64 * 31 + s as u64 + 7) >> 13) as u8;
            let sources: Vec<Vec<u8>> = (0..count).map(|s| (0..len).map(|i| byte(i, s)).collect()).collect();
            let init: Vec<u8> = (0..len).map(|i| byte(i, 99)).collect();
            let refs: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
            let mut dst = init.clone();
            xor_sources(&mut dst, &refs, accumulate);
            prop_assert_eq!(&dst, &model(&sources, &init, accumulate));
        }
    }
}
