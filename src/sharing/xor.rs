//! XOR kernels: the only arithmetic the sharing scheme needs.
//!
//! Each kernel is written once as a plain loop that LLVM vectorises, and compiled three times:
//! for AVX-512, for AVX2 and for the baseline target. The widest one the CPU supports is picked
//! at run time (`is_x86_feature_detected!` caches its answer, so the check costs one load).
//! Callers hand in tiles small enough to stay in L1, so several passes over a tile are cheap.

macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        #[inline]
        pub fn $name($($arg: $ty),*) {
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

/// `dst = XOR of all sources` like [`xor_sources`], but written with non-temporal stores where
/// the CPU has AVX-512 or AVX2, and fenced before returning.
///
/// For outputs that are written once and not read again soon (the shares of a split, which go
/// to other threads and sites): a streaming store does not first read the destination line
/// into the cache, which cuts the memory traffic of a split from seven to four bytes per byte
/// produced for (2,3). Sources are read with ordinary loads (they are tiles that sit in L1).
pub fn xor_sources_stream(dst: &mut [u8], sources: &[&[u8]]) {
    assert!(
        sources.iter().all(|s| s.len() == dst.len()),
        "xor_sources_stream: length mismatch"
    );
    if sources.is_empty() {
        return dst.fill(0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; lengths were checked above.
            return unsafe { stream::xor_avx512(dst, sources) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2; lengths were checked above.
            return unsafe { stream::xor_avx2(dst, sources) };
        }
    }
    xor_sources(dst, sources, false)
}

#[cfg(target_arch = "x86_64")]
mod stream {
    use std::arch::x86_64::*;

    /// The bytes before `dst` reaches `align` and the whole vectors after it: (head, body end).
    fn split_aligned(dst: &[u8], align: usize) -> (usize, usize) {
        let head = dst.as_ptr().align_offset(align).min(dst.len());
        (head, head + (dst.len() - head) / align * align)
    }

    fn xor_scalar(dst: &mut [u8], sources: &[&[u8]], range: std::ops::Range<usize>) {
        for i in range {
            dst[i] = sources.iter().fold(0, |acc, s| acc ^ s[i]);
        }
    }

    macro_rules! stream_kernel {
        ($name:ident, $feature:literal, $width:literal, $vec:ty, $load:ident, $xor:ident, $store:ident) => {
            /// # Safety
            /// The CPU must support the enabled feature; every source is `dst.len()` bytes.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(dst: &mut [u8], sources: &[&[u8]]) {
                let (head, end) = split_aligned(dst, $width);
                xor_scalar(dst, sources, 0..head);
                let out = dst.as_mut_ptr();
                let mut i = head;
                // SAFETY (all loads and stores below): i + $width <= end <= len of dst and of
                // every source; stores are aligned because dst + head is.
                match sources {
                    [a] => {
                        while i < end {
                            $store(
                                out.add(i) as *mut $vec,
                                $load(a.as_ptr().add(i) as *const $vec),
                            );
                            i += $width;
                        }
                    }
                    [a, b] => {
                        while i < end {
                            let v = $xor(
                                $load(a.as_ptr().add(i) as *const $vec),
                                $load(b.as_ptr().add(i) as *const $vec),
                            );
                            $store(out.add(i) as *mut $vec, v);
                            i += $width;
                        }
                    }
                    [first, rest @ ..] => {
                        while i < end {
                            let mut v = $load(first.as_ptr().add(i) as *const $vec);
                            for s in rest {
                                v = $xor(v, $load(s.as_ptr().add(i) as *const $vec));
                            }
                            $store(out.add(i) as *mut $vec, v);
                            i += $width;
                        }
                    }
                    [] => unreachable!("checked by the caller"),
                }
                let len = dst.len();
                xor_scalar(dst, sources, end..len);
                // Streaming stores are weakly ordered: make them visible before anyone is told.
                _mm_sfence();
            }
        };
    }

    stream_kernel!(
        xor_avx512,
        "avx512f",
        64,
        __m512i,
        _mm512_loadu_si512,
        _mm512_xor_si512,
        _mm512_stream_si512
    );
    stream_kernel!(
        xor_avx2,
        "avx2",
        32,
        __m256i,
        _mm256_loadu_si256,
        _mm256_xor_si256,
        _mm256_stream_si256
    );
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
            // The streaming kernel at every alignment of the destination.
            let mut buf = vec![0xa5u8; len + 64];
            for shift in [0, 1, 31, 32, 63] {
                let dst = &mut buf[shift..shift + len];
                xor_sources_stream(dst, &refs);
                prop_assert_eq!(&*dst, &model(&sources, &init, false)[..]);
            }
        }
    }
}
