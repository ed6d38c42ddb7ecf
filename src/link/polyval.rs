//! POLYVAL (RFC 8452) with an aggregated PCLMULQDQ kernel.
//!
//! The `polyval` crate (0.6) multiplies one block at a time, a latency-bound chain that
//! runs near 1.9 GB/s here. POLYVAL is linear, so 8 blocks can be folded at once:
//! `acc' = (acc ^ X1)·H^8 ^ X2·H^7 ^ ... ^ X8·H^1`, with the 8 products summed unreduced
//! and reduced once, which turns the chain into independent multiplies. (AVX-512
//! VPCLMULQDQ would fold 4 blocks per instruction, but its intrinsics need Rust 1.89 and
//! the workspace MSRV is 1.85.) Without PCLMULQDQ the `polyval` crate is used; tests check
//! both paths against it bit for bit.
//!
//! `H` and every power of it are one-time key material: zeroized on drop, never printed.
use zeroize::Zeroize;

/// Blocks folded per step of the wide kernel.
const WIDE: usize = 8;

/// One POLYVAL computation keyed by `H`. Feed whole 16-byte blocks with
/// [`Polyval::update_blocks`] and the last partial block with [`Polyval::update_padded`].
pub struct Polyval {
    inner: Inner,
}

#[allow(clippy::large_enum_variant)] // lives on the stack, one per frame
enum Inner {
    #[cfg(target_arch = "x86_64")]
    Wide(wide::State),
    Soft(polyval::Polyval),
}

impl std::fmt::Debug for Polyval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Polyval { .. }")
    }
}

impl Polyval {
    /// A POLYVAL instance keyed by `h`, using the fastest kernel this CPU supports.
    pub fn new(h: &[u8; 16]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if wide::supported() {
            return Self {
                inner: Inner::Wide(wide::State::new(h)),
            };
        }
        Self::new_portable(h)
    }

    /// A POLYVAL instance on the `polyval` crate (the reference the wide kernel is tested against).
    pub fn new_portable(h: &[u8; 16]) -> Self {
        use universal_hash::KeyInit;
        Self {
            inner: Inner::Soft(polyval::Polyval::new(h.into())),
        }
    }

    /// Name of the kernel in use ("vpclmulqdq-512", "pclmulqdq-128" or "polyval-crate").
    pub fn kernel(&self) -> &'static str {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Wide(s) if s.is_zmm() => "vpclmulqdq-512",
            #[cfg(target_arch = "x86_64")]
            Inner::Wide(_) => "pclmulqdq-128",
            Inner::Soft(_) => "polyval-crate",
        }
    }

    /// Absorb whole blocks. Panics if `data.len()` is not a multiple of 16 (a caller bug).
    pub fn update_blocks(&mut self, data: &[u8]) {
        assert!(
            data.len().is_multiple_of(16),
            "POLYVAL input must be whole blocks"
        );
        match &mut self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Wide(s) => s.update(data),
            Inner::Soft(p) => {
                use universal_hash::UniversalHash;
                p.update_padded(data);
            }
        }
    }

    /// Absorb `data`, zero-padding its last block.
    pub fn update_padded(&mut self, data: &[u8]) {
        let whole = data.len() - data.len() % 16;
        self.update_blocks(&data[..whole]);
        if whole < data.len() {
            let mut last = [0u8; 16];
            last[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.update_blocks(&last);
        }
    }

    /// The POLYVAL value of everything absorbed.
    pub fn finalize(self) -> [u8; 16] {
        match self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Wide(s) => s.finalize(),
            Inner::Soft(p) => {
                use universal_hash::UniversalHash;
                p.finalize().into()
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{Zeroize, WIDE};
    use std::arch::x86_64::*;

    pub(super) fn supported() -> bool {
        std::is_x86_feature_detected!("pclmulqdq") && std::is_x86_feature_detected!("sse2")
    }

    /// AVX-512F with OS support for ZMM state, and VPCLMULQDQ (CPUID.7.0:ECX bit 10).
    /// Asked once: in a VM every CPUID instruction traps to the hypervisor, and done per
    /// frame it was a fifth of the MAC's time in a site daemon's profile.
    fn zmm_supported() -> bool {
        static ZMM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ZMM.get_or_init(|| {
            // SAFETY: CPUID leaf 7 exists on every CPU that reports AVX-512F.
            // (`unsafe` is needed on older compilers.)
            #[allow(unused_unsafe)]
            let leaf7 = || unsafe { __cpuid_count(7, 0) };
            std::is_x86_feature_detected!("avx512f") && leaf7().ecx & (1 << 10) != 0
        })
    }

    /// Accumulator and the powers `H^16 .. H^1` in block order (`powers[j]` multiplies
    /// block `j` of a 16-block step; the 8-block step uses `powers[8..]`).
    pub(super) struct State {
        acc: [u8; 16],
        h: [u8; 16],
        powers: [[u8; 16]; 2 * WIDE],
        zmm: bool,
    }

    impl Drop for State {
        fn drop(&mut self) {
            self.acc.zeroize();
            self.h.zeroize();
            self.powers.zeroize();
        }
    }

    impl State {
        pub(super) fn new(h: &[u8; 16]) -> Self {
            let mut powers = [[0u8; 16]; 2 * WIDE];
            // SAFETY: `supported()` was checked by the caller.
            unsafe {
                let hv = _mm_loadu_si128(h.as_ptr().cast());
                let mut p = hv;
                for i in (0..2 * WIDE).rev() {
                    _mm_storeu_si128(powers[i].as_mut_ptr().cast(), p);
                    if i > 0 {
                        p = dot(p, hv);
                    }
                }
            }
            Self {
                acc: [0; 16],
                h: *h,
                powers,
                zmm: zmm_supported(),
            }
        }

        /// Whether the 512-bit kernel is in use.
        pub(super) fn is_zmm(&self) -> bool {
            self.zmm
        }

        pub(super) fn update(&mut self, data: &[u8]) {
            let mut data = data;
            if self.zmm && data.len() >= 256 {
                let whole = data.len() - data.len() % 256;
                // SAFETY: `zmm` is only set when AVX-512F and VPCLMULQDQ are available.
                unsafe { update_zmm(&mut self.acc, &self.powers, &data[..whole]) };
                data = &data[whole..];
            }
            // SAFETY: a `State` only exists when `supported()` is true.
            unsafe { update(self, data) }
        }

        pub(super) fn finalize(self) -> [u8; 16] {
            self.acc
        }
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn reduce(hi: __m128i, lo: __m128i) -> __m128i {
        // Montgomery reduction by x^128 modulo x^128 + x^127 + x^126 + x^121 + 1
        // (Gueron's AES-GCM-SIV formulation).
        let poly = _mm_set_epi64x(0xc200_0000_0000_0000u64 as i64, 1);
        let t = _mm_clmulepi64_si128(lo, poly, 0x10);
        let lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
        let t = _mm_clmulepi64_si128(lo, poly, 0x10);
        let lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t);
        _mm_xor_si128(hi, lo)
    }

    /// POLYVAL's `dot(a, b) = a·b·x^-128`.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn dot(a: __m128i, b: __m128i) -> __m128i {
        let lo = _mm_clmulepi64_si128(a, b, 0x00);
        let hi = _mm_clmulepi64_si128(a, b, 0x11);
        let mid = _mm_xor_si128(
            _mm_clmulepi64_si128(a, b, 0x01),
            _mm_clmulepi64_si128(a, b, 0x10),
        );
        let lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
        let hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
        reduce(hi, lo)
    }

    #[target_feature(enable = "pclmulqdq,sse2")]
    unsafe fn update(st: &mut State, data: &[u8]) {
        debug_assert!(data.len().is_multiple_of(16));
        let mut acc = _mm_loadu_si128(st.acc.as_ptr().cast());
        let steps = data.chunks_exact(16 * WIDE);
        let rest = steps.remainder();
        if data.len() >= 16 * WIDE {
            let p: [__m128i; WIDE] =
                std::array::from_fn(|i| _mm_loadu_si128(st.powers[WIDE + i].as_ptr().cast()));
            for step in steps {
                let ptr = step.as_ptr();
                let x = _mm_xor_si128(_mm_loadu_si128(ptr.cast()), acc);
                let mut lo = _mm_clmulepi64_si128(x, p[0], 0x00);
                let mut hi = _mm_clmulepi64_si128(x, p[0], 0x11);
                let mut mid = _mm_xor_si128(
                    _mm_clmulepi64_si128(x, p[0], 0x01),
                    _mm_clmulepi64_si128(x, p[0], 0x10),
                );
                for (j, h) in p.iter().enumerate().skip(1) {
                    let x = _mm_loadu_si128(ptr.add(16 * j).cast());
                    lo = _mm_xor_si128(lo, _mm_clmulepi64_si128(x, *h, 0x00));
                    hi = _mm_xor_si128(hi, _mm_clmulepi64_si128(x, *h, 0x11));
                    mid = _mm_xor_si128(
                        mid,
                        _mm_xor_si128(
                            _mm_clmulepi64_si128(x, *h, 0x01),
                            _mm_clmulepi64_si128(x, *h, 0x10),
                        ),
                    );
                }
                let lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
                let hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
                acc = reduce(hi, lo);
            }
        }
        let h = _mm_loadu_si128(st.h.as_ptr().cast());
        for block in rest.chunks_exact(16) {
            acc = dot(
                _mm_xor_si128(acc, _mm_loadu_si128(block.as_ptr().cast())),
                h,
            );
        }
        _mm_storeu_si128(st.acc.as_mut_ptr().cast(), acc);
    }

    /// Low qword 1, high qword 0xc2 << 56: the reduction constant of `reduce`.
    static POLY: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xc2];

    /// 16 blocks per step with 512-bit VPCLMULQDQ (4 blocks per instruction), written as
    /// inline assembly because the AVX-512 intrinsics need Rust 1.89 (MSRV is 1.85). Same
    /// maths as `update`: unreduced schoolbook products of the 16 blocks with
    /// `H^16 .. H^1`, summed, folded to 128+128 bits, one Montgomery reduction.
    /// Only zmm0-15 are used and all of xmm0-15 are declared clobbered (vzeroupper at the end).
    ///
    /// SAFETY: the CPU must support AVX-512F and VPCLMULQDQ; `data.len()` a multiple of 256.
    unsafe fn update_zmm(acc: &mut [u8; 16], powers: &[[u8; 16]; 2 * WIDE], data: &[u8]) {
        debug_assert!(data.len().is_multiple_of(256) && !data.is_empty());
        let steps = data.len() / 256;
        std::arch::asm!(
            "vmovdqu64 zmm0, zmmword ptr [{p}]",
            "vmovdqu64 zmm1, zmmword ptr [{p} + 64]",
            "vmovdqu64 zmm2, zmmword ptr [{p} + 128]",
            "vmovdqu64 zmm3, zmmword ptr [{p} + 192]",
            "vmovdqu xmm4, xmmword ptr [{acc}]",
            "vmovdqu xmm5, xmmword ptr [{poly}]",
            "2:",
            "vmovdqu64 zmm6, zmmword ptr [{d}]",
            "vmovdqu64 zmm7, zmmword ptr [{d} + 64]",
            "vmovdqu64 zmm8, zmmword ptr [{d} + 128]",
            "vmovdqu64 zmm9, zmmword ptr [{d} + 192]",
            "vpxorq zmm6, zmm6, zmm4",
            "vpclmulqdq zmm10, zmm6, zmm0, 0x00",
            "vpclmulqdq zmm11, zmm6, zmm0, 0x11",
            "vpclmulqdq zmm12, zmm6, zmm0, 0x01",
            "vpclmulqdq zmm13, zmm6, zmm0, 0x10",
            "vpxorq zmm12, zmm12, zmm13",
            "vpclmulqdq zmm13, zmm7, zmm1, 0x00",
            "vpclmulqdq zmm14, zmm7, zmm1, 0x11",
            "vpxorq zmm10, zmm10, zmm13",
            "vpxorq zmm11, zmm11, zmm14",
            "vpclmulqdq zmm13, zmm7, zmm1, 0x01",
            "vpclmulqdq zmm14, zmm7, zmm1, 0x10",
            "vpternlogq zmm12, zmm13, zmm14, 0x96",
            "vpclmulqdq zmm13, zmm8, zmm2, 0x00",
            "vpclmulqdq zmm14, zmm8, zmm2, 0x11",
            "vpxorq zmm10, zmm10, zmm13",
            "vpxorq zmm11, zmm11, zmm14",
            "vpclmulqdq zmm13, zmm8, zmm2, 0x01",
            "vpclmulqdq zmm14, zmm8, zmm2, 0x10",
            "vpternlogq zmm12, zmm13, zmm14, 0x96",
            "vpclmulqdq zmm13, zmm9, zmm3, 0x00",
            "vpclmulqdq zmm14, zmm9, zmm3, 0x11",
            "vpxorq zmm10, zmm10, zmm13",
            "vpxorq zmm11, zmm11, zmm14",
            "vpclmulqdq zmm13, zmm9, zmm3, 0x01",
            "vpclmulqdq zmm14, zmm9, zmm3, 0x10",
            "vpternlogq zmm12, zmm13, zmm14, 0x96",
            // Fold the four 128-bit lanes of lo (10), hi (11), mid (12).
            "vextracti64x4 ymm13, zmm10, 1",
            "vextracti64x4 ymm14, zmm11, 1",
            "vextracti64x4 ymm15, zmm12, 1",
            "vpxor ymm10, ymm10, ymm13",
            "vpxor ymm11, ymm11, ymm14",
            "vpxor ymm12, ymm12, ymm15",
            "vextracti128 xmm13, ymm10, 1",
            "vextracti128 xmm14, ymm11, 1",
            "vextracti128 xmm15, ymm12, 1",
            "vpxor xmm10, xmm10, xmm13",
            "vpxor xmm11, xmm11, xmm14",
            "vpxor xmm12, xmm12, xmm15",
            // lo ^= mid << 64; hi ^= mid >> 64
            "vpslldq xmm13, xmm12, 8",
            "vpsrldq xmm12, xmm12, 8",
            "vpxor xmm10, xmm10, xmm13",
            "vpxor xmm11, xmm11, xmm12",
            // Montgomery reduction (as `reduce`); the VEX write zeroes zmm4's upper lanes.
            "vpclmulqdq xmm13, xmm10, xmm5, 0x10",
            "vpshufd xmm10, xmm10, 0x4e",
            "vpxor xmm10, xmm10, xmm13",
            "vpclmulqdq xmm13, xmm10, xmm5, 0x10",
            "vpshufd xmm10, xmm10, 0x4e",
            "vpxor xmm10, xmm10, xmm13",
            "vpxor xmm4, xmm11, xmm10",
            "add {d}, 256",
            "dec {n}",
            "jnz 2b",
            "vmovdqu xmmword ptr [{acc}], xmm4",
            "vzeroupper",
            p = in(reg) powers.as_ptr(),
            acc = in(reg) acc.as_mut_ptr(),
            poly = in(reg) POLY.as_ptr(),
            d = inout(reg) data.as_ptr() => _,
            n = inout(reg) steps => _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Polyval;
    use proptest::prelude::*;

    fn reference(h: &[u8; 16], data: &[u8]) -> [u8; 16] {
        use universal_hash::{KeyInit, UniversalHash};
        let mut p = polyval::Polyval::new(h.into());
        p.update_padded(data);
        p.finalize().into()
    }

    #[test]
    fn rfc8452_vector() {
        // RFC 8452 appendix A.
        let h: [u8; 16] = hex("25629347589242761d31f826ba4b757b");
        let x1 = hex::<16>("4f4f95668c83dfb6401762bb2d01a262");
        let x2 = hex::<16>("d1a24ddd2721d006bbe45f20d3c9f362");
        let mut p = Polyval::new(&h);
        p.update_blocks(&x1);
        p.update_blocks(&x2);
        assert_eq!(p.finalize(), hex("f7a3b47b846119fae5b7866cf5e5b77e"));
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn wide_matches_reference_across_step_boundaries() {
        let h = [0x5au8; 16];
        let data: Vec<u8> = (0..16 * 100).map(|i| (i * 7 + 3) as u8).collect();
        for blocks in [
            0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 48, 64, 100,
        ] {
            let d = &data[..16 * blocks];
            let mut p = Polyval::new(&h);
            p.update_blocks(d);
            assert_eq!(p.finalize(), reference(&h, d), "{blocks} blocks");
        }
    }

    proptest! {
        #[test]
        fn matches_reference(h in any::<[u8; 16]>(), data in proptest::collection::vec(any::<u8>(), 0..2000), split in 0usize..2000) {
            let split = (split.min(data.len()) / 16) * 16;
            let mut p = Polyval::new(&h);
            p.update_blocks(&data[..split]);
            p.update_padded(&data[split..]);
            prop_assert_eq!(p.finalize(), reference(&h, &data));
            let mut q = Polyval::new_portable(&h);
            q.update_padded(&data);
            prop_assert_eq!(q.finalize(), reference(&h, &data));
        }
    }
}
