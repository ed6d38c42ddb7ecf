//! Sealing and opening of frames: one-time pad + Wegman–Carter POLYVAL tag. Pure: the key
//! comes in through a [`FrameKey`], so these functions do no I/O themselves and can be
//! tested with in-memory key.
//!
//! A frame's key, as these functions see it (relative offsets): bytes 0..16 are the POLYVAL
//! key `H`, 16..32 the one-time mask `s`, the rest the pad. Where those bytes lie in the pool
//! (whole key blocks, the pad skipping each block's MAC key slot) is the [`FrameKey`]'s
//! business ([`crate::wire::frame::key_position`]); it tells where the key breaks
//! ([`FrameKey::contiguous`]) and pieces never cross a break. Tag =
//! `POLYVAL_H(header || 0-pad || ciphertext || 0-pad || le64(header bits) || le64(ct bits)) ^ s`.
//!
//! XOR and MAC are fused per `CHUNK` bytes: the pad of a chunk is XORed with the data straight
//! from the key source's memory when it has the key mapped ([`FrameKey::mapped`]), or else
//! read by the key source straight into `out` (where the result goes) and the data XORed into
//! it; the chunk is hashed while still in cache. No other copy of the pad is made.
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::polyval::Polyval;
use crate::sharing::xor::{xor2, xor_into};
use crate::wire::frame::{FrameHeader, HEADER_LEN, MAC_KEY_LEN, TAG_LEN};

/// Bytes processed at a time (fits in L2 together with the pad it meets).
pub const CHUNK: usize = 128 * 1024;

/// The key range of one frame; offsets are relative to the start of the range.
pub trait FrameKey {
    type Error;
    /// Copy key bytes into `buf` (the MAC key, and each chunk's pad, read straight into the
    /// output buffer).
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// The `len` key bytes at `rel` in place, when the key is mapped in memory; `None` makes
    /// the caller [`read`](Self::read) them instead.
    fn mapped(&self, rel: u64, len: usize) -> Option<&[u8]> {
        let _ = (rel, len);
        None
    }
    /// How many key bytes from `rel` on lie together, so that they may be read or lent in
    /// one piece (a frame's pad skips the MAC key slots of the blocks it crosses).
    fn contiguous(&self, rel: u64) -> u64 {
        let _ = rel;
        u64::MAX
    }
}

/// Length of the next piece at key offset `rel` (relative to the frame's key, MAC key
/// first) with `left` payload bytes to go: at most [`CHUNK`], and never across a break in
/// the key.
fn piece<K: FrameKey>(key: &K, rel: u64, left: usize) -> usize {
    let run = key.contiguous(rel).min(CHUNK as u64) as usize;
    run.min(left)
}

/// A key lent for one seal or open.
impl<K: FrameKey + ?Sized> FrameKey for &mut K {
    type Error = K::Error;
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read(rel, buf)
    }
    fn mapped(&self, rel: u64, len: usize) -> Option<&[u8]> {
        (**self).mapped(rel, len)
    }
    fn contiguous(&self, rel: u64) -> u64 {
        (**self).contiguous(rel)
    }
}

/// Key held in a slice (tests, benchmarks): in place, like a mapped pool.
impl FrameKey for &[u8] {
    type Error = std::convert::Infallible;
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        buf.copy_from_slice(&self[rel as usize..rel as usize + buf.len()]);
        Ok(())
    }
    fn mapped(&self, rel: u64, len: usize) -> Option<&[u8]> {
        self.get(rel as usize..rel as usize + len)
    }
}

/// Why sealing or opening failed. `E` is the error of the key source.
#[derive(Debug)]
pub enum SealError<E> {
    /// Reading key failed.
    Key(E),
    /// The frame's MAC key reads as zeros: that key was destroyed (used before).
    KeyDestroyed,
    /// The tag does not match: the frame was altered or forged.
    BadTag,
}

/// Seal the concatenation of `parts` (the payload, given in pieces so that a message head and
/// the bulk data it carries need not be copied together first) under `header` into `out`
/// (resized to the frame, capacity reused). On error `out` is wiped.
pub fn seal<K: FrameKey>(
    header: &FrameHeader,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
    key: &mut K,
) -> Result<(), SealError<K::Error>> {
    let mut sealer = Sealer::new(header, parts, key)?;
    let len = header.payload_len as usize;
    // Sized without clearing: every byte is overwritten below, and a buffer reused for frames
    // of one size is never memset.
    out.resize(header.frame_len(), 0);
    out[..HEADER_LEN].copy_from_slice(sealer.header());
    if let Err(e) = sealer.next(&mut out[HEADER_LEN..HEADER_LEN + len], key) {
        out.zeroize();
        return Err(e);
    }
    out[HEADER_LEN + len..].copy_from_slice(&sealer.finish());
    Ok(())
}

/// A frame sealed piece by piece: its header, then its ciphertext in as many pieces as the
/// caller likes (each written out while still in cache, say), then its tag.
pub struct Sealer<'a> {
    header: [u8; HEADER_LEN],
    mac: Polyval,
    s: Zeroizing<[u8; 16]>,
    src: Parts<'a>,
    done: usize,
    len: usize,
}

impl<'a> Sealer<'a> {
    /// Start sealing the concatenation of `parts` under `header` (reads the frame's MAC key).
    pub fn new<K: FrameKey>(
        header: &FrameHeader,
        parts: &'a [&'a [u8]],
        key: &mut K,
    ) -> Result<Self, SealError<K::Error>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert_eq!(header.payload_len, len as u64);
        let (mut mac, s) = mac_init(key)?;
        let header = header.encode();
        mac.update_padded(&header);
        Ok(Self {
            header,
            mac,
            s,
            src: Parts::new(parts),
            done: 0,
            len,
        })
    }

    /// The frame's header, which goes first.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// Payload bytes not yet sealed.
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Seal the next `dst.len()` payload bytes into `dst`. Every piece but the last must be
    /// a whole number of 16-byte blocks (a caller bug otherwise: panics).
    pub fn next<K: FrameKey>(
        &mut self,
        dst: &mut [u8],
        key: &mut K,
    ) -> Result<(), SealError<K::Error>> {
        assert!(
            dst.len() <= self.remaining(),
            "Sealer::next past the payload"
        );
        assert!(
            dst.len().is_multiple_of(16) || dst.len() == self.remaining(),
            "Sealer::next: only the last piece may end inside a block"
        );
        let mut rest = dst;
        while !rest.is_empty() {
            let rel = MAC_KEY_LEN + self.done as u64;
            let n = piece(key, rel, rest.len());
            let (c, later) = std::mem::take(&mut rest).split_at_mut(n);
            rest = later;
            if let Some(pad) = key.mapped(rel, c.len()) {
                self.src.next_xor(c, Some(pad));
            } else {
                key.read(rel, c).map_err(SealError::Key)?;
                self.src.next_xor(c, None);
            }
            self.mac.update_padded(c);
            self.done += c.len();
        }
        Ok(())
    }

    /// The tag, which goes last (once the whole payload is sealed).
    pub fn finish(self) -> [u8; TAG_LEN] {
        assert_eq!(
            self.remaining(),
            0,
            "Sealer::finish before the payload's end"
        );
        finish(self.mac, &self.s, self.len)
    }
}

/// A cursor over a payload given in parts.
struct Parts<'a> {
    rest: &'a [&'a [u8]],
    at: usize,
}

impl<'a> Parts<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        Self { rest: parts, at: 0 }
    }

    /// `dst` = the next `dst.len()` payload bytes XOR `pad` (or XOR `dst` itself, without).
    fn next_xor(&mut self, mut dst: &mut [u8], mut pad: Option<&[u8]>) {
        while !dst.is_empty() {
            let (part, more) = self.rest.split_first().expect("parts cover the payload");
            let n = dst.len().min(part.len() - self.at);
            let (now, later) = dst.split_at_mut(n);
            let data = &part[self.at..self.at + n];
            match pad {
                Some(p) => {
                    let (p_now, p_later) = p.split_at(n);
                    xor2(now, data, p_now);
                    pad = Some(p_later);
                }
                None => xor_into(now, data),
            }
            dst = later;
            self.at += n;
            if self.at == part.len() {
                self.rest = more;
                self.at = 0;
            }
        }
    }
}

/// Open a frame whose ciphertext was received straight into `body` (its pieces, in order:
/// say a message head in one buffer and the share it carries in the store buffer it is
/// written from) and whose tag is `tag`: verify it and decrypt `body` in place. Each chunk is
/// hashed and then XORed while in cache, and no second buffer of the payload's size is
/// touched. On any failure every piece of `body` is wiped before returning.
pub fn open_in_place<K: FrameKey>(
    header: &FrameHeader,
    body: &mut [&mut [u8]],
    tag: &[u8],
    key: &mut K,
) -> Result<(), SealError<K::Error>> {
    assert_eq!(tag.len(), TAG_LEN, "open_in_place: tag length");
    let want = crypt_in_place(header, body, key, Way::Open)?;
    if bool::from(want.ct_eq(tag)) {
        Ok(())
    } else {
        body.iter_mut().for_each(|b| b.zeroize());
        Err(SealError::BadTag)
    }
}

/// Seal the payload in `body` (its pieces, in order: say a message head, then a share in the
/// buffer it was read into) in place, each chunk XORed and then hashed while in cache; the
/// frame is `header`, `body`, and the tag returned. On a failure every piece is wiped.
pub fn seal_in_place<K: FrameKey>(
    header: &FrameHeader,
    body: &mut [&mut [u8]],
    key: &mut K,
) -> Result<[u8; TAG_LEN], SealError<K::Error>> {
    crypt_in_place(header, body, key, Way::Seal)
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Seal,
    Open,
}

/// XOR the pad into `body` in place and return the tag of the ciphertext (hashed after the
/// XOR when sealing, before it when opening). Wipes `body` on a failure.
fn crypt_in_place<K: FrameKey>(
    header: &FrameHeader,
    body: &mut [&mut [u8]],
    key: &mut K,
    way: Way,
) -> Result<[u8; TAG_LEN], SealError<K::Error>> {
    let len = header.payload_len as usize;
    assert_eq!(
        body.iter().map(|b| b.len()).sum::<usize>(),
        len,
        "in place: the pieces must hold the payload exactly"
    );
    let wipe = |body: &mut [&mut [u8]]| body.iter_mut().for_each(|b| b.zeroize());
    let mut crypt = match Crypt::new(header, key, way) {
        Ok(c) => c,
        Err(e) => {
            wipe(body);
            return Err(e);
        }
    };
    for part in body.iter_mut() {
        if let Err(e) = crypt.update(part) {
            wipe(body);
            return Err(e);
        }
    }
    Ok(crypt.tag())
}

/// Opens a frame's ciphertext in place as it arrives, in pieces of any length, in order:
/// each piece is hashed and decrypted while in cache, so a receiver can open the start of a
/// share while the rest is still on the wire. Nothing it gives is verified before
/// [`InPlaceOpen::finish`] checks the tag; the caller wipes what it decrypted if that fails.
pub struct InPlaceOpen<K: FrameKey> {
    crypt: Crypt<K>,
    left: usize,
}

impl<K: FrameKey> InPlaceOpen<K> {
    /// For the frame `header`, with `key` at the frame's key offset (MAC key first).
    pub fn new(header: &FrameHeader, key: K) -> Result<Self, SealError<K::Error>> {
        Ok(Self {
            crypt: Crypt::new(header, key, Way::Open)?,
            left: header.payload_len as usize,
        })
    }

    /// Decrypts the next `piece` of the ciphertext in place (hashing it first).
    pub fn update(&mut self, piece: &mut [u8]) -> Result<(), SealError<K::Error>> {
        assert!(
            piece.len() <= self.left,
            "in place: more ciphertext than the frame holds"
        );
        self.left -= piece.len();
        self.crypt.update(piece)
    }

    /// Checks the frame's `tag` once every byte was given.
    pub fn finish(self, tag: &[u8]) -> Result<(), SealError<K::Error>> {
        assert_eq!(tag.len(), TAG_LEN, "open: tag length");
        assert_eq!(
            self.left, 0,
            "in place: the frame's ciphertext is not all there"
        );
        if bool::from(self.crypt.tag().ct_eq(tag)) {
            Ok(())
        } else {
            Err(SealError::BadTag)
        }
    }
}

/// The running state of a seal or an open: the MAC, where in the payload it is, the key.
struct Crypt<K> {
    key: K,
    way: Way,
    mac: BlockFeed,
    s: Zeroizing<[u8; 16]>,
    at: usize,
    len: usize,
    /// Pad bytes copied out of a key source that cannot lend them in place (wiped on drop).
    scratch: Option<Zeroizing<Vec<u8>>>,
}

impl<K: FrameKey> Crypt<K> {
    fn new(header: &FrameHeader, mut key: K, way: Way) -> Result<Self, SealError<K::Error>> {
        let (mac, s) = mac_init(&mut key)?;
        let mut mac = BlockFeed::new(mac);
        mac.update(&header.encode());
        mac.pad();
        Ok(Crypt {
            key,
            way,
            mac,
            s,
            at: 0,
            len: header.payload_len as usize,
            scratch: None,
        })
    }

    fn update(&mut self, part: &mut [u8]) -> Result<(), SealError<K::Error>> {
        let mut rest = part;
        while !rest.is_empty() {
            let rel = MAC_KEY_LEN + self.at as u64;
            let n = piece(&self.key, rel, rest.len());
            let (c, later) = std::mem::take(&mut rest).split_at_mut(n);
            rest = later;
            if self.way == Way::Open {
                self.mac.update(c);
            }
            if let Some(pad) = self.key.mapped(rel, c.len()) {
                xor_into(c, pad);
            } else {
                let pad = self
                    .scratch
                    .get_or_insert_with(|| Zeroizing::new(vec![0; CHUNK]));
                let pad = &mut pad[..c.len()];
                self.key.read(rel, pad).map_err(SealError::Key)?;
                xor_into(c, pad);
            }
            if self.way == Way::Seal {
                self.mac.update(c);
            }
            self.at += c.len();
        }
        Ok(())
    }

    fn tag(self) -> [u8; TAG_LEN] {
        finish(self.mac.finish(), &self.s, self.len)
    }
}

/// POLYVAL fed with byte strings of any length, cut into whole blocks across calls (the
/// ciphertext of an in-place open arrives in pieces that need not end on a block).
struct BlockFeed {
    mac: Polyval,
    carry: [u8; 16],
    n: usize,
}

impl BlockFeed {
    fn new(mac: Polyval) -> Self {
        Self {
            mac,
            carry: [0; 16],
            n: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        if self.n > 0 {
            let take = data.len().min(16 - self.n);
            self.carry[self.n..self.n + take].copy_from_slice(&data[..take]);
            self.n += take;
            data = &data[take..];
            if self.n < 16 {
                return;
            }
            self.mac.update_blocks(&self.carry);
            self.n = 0;
        }
        let whole = data.len() - data.len() % 16;
        self.mac.update_blocks(&data[..whole]);
        self.n = data.len() - whole;
        self.carry[..self.n].copy_from_slice(&data[whole..]);
    }

    /// Zero-pad what has been fed to a whole block.
    fn pad(&mut self) {
        if self.n > 0 {
            self.carry[self.n..].fill(0);
            self.mac.update_blocks(&self.carry);
            self.n = 0;
        }
    }

    fn finish(mut self) -> Polyval {
        self.pad();
        self.mac
    }
}

/// POLYVAL keyed with `H` and the one-time mask `s`.
type MacState = (Polyval, Zeroizing<[u8; 16]>);

fn mac_init<K: FrameKey>(key: &mut K) -> Result<MacState, SealError<K::Error>> {
    let mut mk = Zeroizing::new([0u8; MAC_KEY_LEN as usize]);
    key.read(0, &mut mk[..]).map_err(SealError::Key)?;
    // Destroyed key reads as zeros; H = 0, s = 0 would make every tag 0.
    if bool::from(mk.ct_eq(&[0u8; MAC_KEY_LEN as usize])) {
        return Err(SealError::KeyDestroyed);
    }
    let h: &[u8; 16] = mk[..16].try_into().expect("16 bytes");
    let s = Zeroizing::new(<[u8; 16]>::try_from(&mk[16..32]).expect("16 bytes"));
    Ok((Polyval::new(h), s))
}

fn finish(mac: Polyval, s: &[u8; 16], ct_len: usize) -> [u8; TAG_LEN] {
    let mut mac = mac;
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&((HEADER_LEN as u64) * 8).to_le_bytes());
    lens[8..].copy_from_slice(&((ct_len as u64) * 8).to_le_bytes());
    mac.update_blocks(&lens);
    let mut tag = mac.finalize();
    for (t, m) in tag.iter_mut().zip(s) {
        *t ^= m;
    }
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn round_trip_and_every_bit_flip_fails() {
        let payload: Vec<u8> = (0..64u8).collect();
        let h = FrameHeader {
            stream_id: [9; 16],
            key_offset: 0,
            payload_len: 64,
        };
        let k = key(32 + 64, 5);
        let mut frame = Vec::new();
        seal(&h, &[&payload], &mut frame, &mut &k[..]).unwrap();
        assert_ne!(&frame[HEADER_LEN..HEADER_LEN + 64], &payload[..]);
        for bit in HEADER_LEN * 8..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            // The ciphertext in two pieces, cut where the bit is.
            let (ct, tag) = f[HEADER_LEN..].split_at_mut(64);
            let (a, b) = ct.split_at_mut(bit % 64);
            let r = open_in_place(&h, &mut [a, b], tag, &mut &k[..]);
            assert!(matches!(r, Err(SealError::BadTag)), "bit {bit}");
            assert!(
                ct.iter().all(|&x| x == 0),
                "bit {bit}: plaintext left behind"
            );
        }
        let mut f = frame.clone();
        let (ct, tag) = f[HEADER_LEN..].split_at_mut(64);
        open_in_place(&h, &mut [ct], tag, &mut &k[..]).unwrap();
        assert_eq!(ct, &payload[..]);
    }

    #[test]
    fn sealing_parts_equals_sealing_their_concatenation() {
        let payload: Vec<u8> = (0..3 * CHUNK + 77).map(|i| (i * 7) as u8).collect();
        let h = FrameHeader {
            stream_id: [3; 16],
            key_offset: 0,
            payload_len: payload.len() as u64,
        };
        let k = key(32 + payload.len(), 9);
        let mut whole = Vec::new();
        seal(&h, &[&payload], &mut whole, &mut &k[..]).unwrap();
        let n = payload.len();
        for cuts in [
            vec![0],
            vec![n],
            vec![1, 2],
            vec![40, CHUNK],
            vec![CHUNK - 1, CHUNK + 1, 2 * CHUNK],
            vec![5, 5, n - 3],
        ] {
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts {
                parts.push(&payload[at..c]);
                at = c;
            }
            parts.push(&payload[at..]);
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            let mut f = vec![0xee; 10];
            seal(&h, &parts, &mut f, &mut &k[..]).unwrap();
            assert_eq!(f, whole, "parts {lens:?}");
            // Opened in place, the ciphertext received into pieces cut the same way (none of
            // them on a POLYVAL block boundary but the ends).
            let mut ct = f[HEADER_LEN..HEADER_LEN + n].to_vec();
            let mut pieces: Vec<&mut [u8]> = Vec::new();
            let mut rest = &mut ct[..];
            for &l in &lens {
                let (p, r) = rest.split_at_mut(l);
                pieces.push(p);
                rest = r;
            }
            open_in_place(&h, &mut pieces, &f[HEADER_LEN + n..], &mut &k[..]).unwrap();
            assert_eq!(ct, payload, "in place {lens:?}");
        }
    }

    /// Key that can only be copied out, like a pool read with `pread`.
    struct Copied<'a>(&'a [u8]);

    impl FrameKey for Copied<'_> {
        type Error = std::convert::Infallible;
        fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
            (&mut &self.0[..]).read(rel, buf)
        }
    }

    /// A payload of `len` bytes (a pattern from `seed`), its frame header, and key for it.
    fn fixture(len: usize, seed: u8) -> (Vec<u8>, FrameHeader, Vec<u8>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13 + seed as usize) as u8).collect();
        let h = FrameHeader {
            stream_id: [seed; 16],
            key_offset: 0,
            payload_len: len as u64,
        };
        (payload, h, key(32 + len, seed))
    }

    #[test]
    fn mapped_and_copied_key_seal_and_open_alike() {
        let (payload, h, k) = fixture(2 * CHUNK + 333, 3);
        let parts = [&payload[..7], &payload[7..CHUNK + 1], &payload[CHUNK + 1..]];
        let (mut mapped, mut copied) = (Vec::new(), Vec::new());
        seal(&h, &parts, &mut mapped, &mut &k[..]).unwrap();
        seal(&h, &parts, &mut copied, &mut Copied(&k)).unwrap();
        assert_eq!(mapped, copied);
        let n = payload.len();
        let mut forged = mapped.clone();
        forged[HEADER_LEN + CHUNK + 17] ^= 0x40;
        // Opened in place with the key lent in place or copied out chunk by chunk into a
        // scratch buffer, the ciphertext cut across a chunk boundary.
        for (cut, copied) in [(CHUNK - 3, true), (CHUNK + 9, false)] {
            let open_with = |frame: &[u8], ct: &mut [u8]| {
                let (a, b) = ct.split_at_mut(cut);
                let tag = &frame[HEADER_LEN + n..];
                match copied {
                    true => open_in_place(&h, &mut [a, b], tag, &mut Copied(&k)),
                    false => open_in_place(&h, &mut [a, b], tag, &mut &k[..]),
                }
            };
            let mut ct = mapped[HEADER_LEN..HEADER_LEN + n].to_vec();
            open_with(&mapped, &mut ct).unwrap();
            assert_eq!(ct, payload);
            let mut ct = forged[HEADER_LEN..HEADER_LEN + n].to_vec();
            let r = open_with(&forged, &mut ct);
            assert!(matches!(r, Err(SealError::BadTag)));
            assert!(ct.iter().all(|&x| x == 0), "plaintext left behind");
        }
    }

    #[test]
    fn sealing_in_place_equals_sealing() {
        let (payload, h, k) = fixture(2 * CHUNK + 77, 7);
        let mut whole = Vec::new();
        seal(&h, &[&payload], &mut whole, &mut &k[..]).unwrap();
        let n = payload.len();
        for cut in [0, 29, CHUNK + 3, n] {
            for copied in [false, true] {
                let mut body = payload.clone();
                let (a, b) = body.split_at_mut(cut);
                let tag = if copied {
                    seal_in_place(&h, &mut [a, b], &mut Copied(&k)).unwrap()
                } else {
                    seal_in_place(&h, &mut [a, b], &mut &k[..]).unwrap()
                };
                assert_eq!(body, whole[HEADER_LEN..HEADER_LEN + n], "cut {cut}");
                assert_eq!(tag, whole[HEADER_LEN + n..], "cut {cut}");
            }
        }
    }

    /// `ct` through `o` in pieces of the lengths `pieces` (the last one cut to what is left),
    /// then the tag.
    fn open_in_pieces<K: FrameKey>(
        mut o: InPlaceOpen<K>,
        ct: &mut [u8],
        tag: &[u8],
        pieces: &[usize],
    ) -> Result<(), SealError<K::Error>> {
        let mut rest = ct;
        for &p in pieces {
            let p = p.min(rest.len());
            let (a, b) = std::mem::take(&mut rest).split_at_mut(p);
            o.update(a)?;
            rest = b;
        }
        o.finish(tag)
    }

    /// An open fed piece by piece (as a share arrives off the socket, cut anywhere, the key
    /// lent in place or copied out) gives the plaintext and verdict of a whole open; a
    /// flipped bit anywhere fails at `finish`.
    #[test]
    fn opening_as_the_ciphertext_arrives_equals_opening_it_whole() {
        let (payload, h, k) = fixture(3 * CHUNK + 101, 11);
        let mut frame = Vec::new();
        seal(&h, &[&payload], &mut frame, &mut &k[..]).unwrap();
        let n = payload.len();
        for (pieces, copied) in [
            (vec![n], false),
            (
                vec![1, 15, 16, CHUNK - 32, CHUNK + 5, n - 2 * CHUNK - 5],
                true,
            ),
            (vec![7; n / 7 + 1], false),
        ] {
            for flip in [None, Some(HEADER_LEN + CHUNK + 3), Some(frame.len() - 1)] {
                let mut f = frame.clone();
                if let Some(at) = flip {
                    f[at] ^= 0x10;
                }
                let (ct, tag) = f[HEADER_LEN..].split_at_mut(n);
                let verdict = if copied {
                    open_in_pieces(InPlaceOpen::new(&h, Copied(&k)).unwrap(), ct, tag, &pieces)
                } else {
                    open_in_pieces(InPlaceOpen::new(&h, &k[..]).unwrap(), ct, tag, &pieces)
                };
                match flip {
                    None => {
                        assert!(verdict.is_ok());
                        assert_eq!(ct, &payload[..]);
                    }
                    Some(at) => assert!(
                        matches!(verdict, Err(SealError::BadTag)),
                        "flip at {at}, pieces {pieces:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn zero_mac_key_is_refused() {
        let h = FrameHeader {
            stream_id: [9; 16],
            key_offset: 0,
            payload_len: 4,
        };
        let k = [0u8; 36];
        let mut frame = Vec::new();
        let r = seal(&h, &[b"abcd"], &mut frame, &mut &k[..]);
        assert!(matches!(r, Err(SealError::KeyDestroyed)));
    }
}
