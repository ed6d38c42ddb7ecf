//! An in-memory volume with the same alignment rules as the real one, plus fault injection.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{check_request, Alignment, BlockDevice, IoBuf, VolumeError};

/// Bytes in memory. `durable` is honoured trivially (memory is "stable" until the value is
/// dropped); crashes are modelled by copying [`MemVolume::image`] into a new volume, and torn
/// writes by [`MemVolume::tear_next_write`].
pub struct MemVolume {
    path: PathBuf,
    align: Alignment,
    state: Mutex<State>,
    /// Writes under way now, and the most there ever were at once.
    writing: [AtomicUsize; 2],
}

struct State {
    bytes: Vec<u8>,
    /// Writes still allowed before every later write fails (None: unlimited).
    writes_left: Option<u64>,
    /// The next write keeps only this many leading bytes, then fails.
    tear_at: Option<usize>,
    /// Durable writes refused, as a [`super::UringVolume`] refuses them after a failed flush.
    durability_lost: bool,
    /// Reads still served before the "ring" stops (None: unlimited).
    reads_left: Option<u64>,
    /// How long each write takes (outside the lock: writes overlap, as on a disk).
    write_time: Duration,
}

impl MemVolume {
    /// A zero-filled volume of `size` bytes (the usable size is rounded down to `align.offset`).
    pub fn new(name: &str, size: u64, align: Alignment) -> Self {
        Self::from_image(name, vec![0; size as usize], align)
    }

    /// A volume holding `bytes`, e.g. the image of another volume after a simulated crash.
    pub fn from_image(name: &str, bytes: Vec<u8>, align: Alignment) -> Self {
        Self {
            path: PathBuf::from(name),
            align,
            state: Mutex::new(State {
                bytes,
                writes_left: None,
                tear_at: None,
                durability_lost: false,
                reads_left: None,
                write_time: Duration::ZERO,
            }),
            writing: Default::default(),
        }
    }

    /// A copy of every byte as it is now.
    pub fn image(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// After `n` more successful writes, every write fails (as a dead disk would).
    pub fn fail_writes_after(&self, n: u64) {
        self.lock().writes_left = Some(n);
    }

    /// From now on refuse durable writes, as a volume whose flush failed does
    /// ([`BlockDevice::durable_writes_refused`]); plain writes and reads go on.
    pub fn lose_durability(&self) {
        self.lock().durability_lost = true;
    }

    fn lost(&self) -> VolumeError {
        VolumeError::DurabilityLost {
            path: self.path.clone(),
            op: "fdatasync",
            source: std::io::Error::other("injected"),
        }
    }

    /// After `n` more reads, every request fails as it does on a [`super::UringVolume`] whose
    /// io_uring thread has stopped.
    pub fn stop_after_reads(&self, n: u64) {
        self.lock().reads_left = Some(n);
    }

    /// From now on each write takes `t` (so that concurrent writes overlap).
    pub fn slow_writes(&self, t: Duration) {
        self.lock().write_time = t;
    }

    /// The most writes that were ever under way at once.
    pub fn writes_at_once(&self) -> usize {
        self.writing[1].load(Ordering::SeqCst)
    }

    /// The next write stores only its first `prefix` bytes and fails (a torn write at a crash).
    pub fn tear_next_write(&self, prefix: usize) {
        self.lock().tear_at = Some(prefix);
    }

    /// Changes one byte behind the store's back (bit rot, tampering).
    pub fn poke(&self, offset: u64, f: impl FnOnce(u8) -> u8) {
        let mut s = self.lock();
        let b = &mut s.bytes[offset as usize];
        *b = f(*b);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, buf: &IoBuf, offset: u64) -> Result<(), VolumeError> {
        check_request(
            self.align,
            self.size(),
            offset,
            buf.len(),
            buf.as_ptr() as usize,
        )
        .map_err(|source| VolumeError::Request {
            path: self.path.clone(),
            source,
        })
    }
}

/// A write under way, counted off when it returns.
struct Writing<'a>(&'a AtomicUsize);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for MemVolume {
    fn path(&self) -> &Path {
        &self.path
    }

    fn alignment(&self) -> Alignment {
        self.align
    }

    fn size(&self) -> u64 {
        self.align.floor(self.lock().bytes.len() as u64)
    }

    fn alloc_buf(&self, len: usize) -> IoBuf {
        IoBuf::heap(self.align.mem as usize, len)
    }

    fn read_at(&self, mut buf: IoBuf, offset: u64) -> Result<IoBuf, VolumeError> {
        self.check(&buf, offset)?;
        let mut s = self.lock();
        if let Some(left) = s.reads_left.as_mut() {
            if *left == 0 {
                return Err(VolumeError::RingGone {
                    path: self.path.clone(),
                });
            }
            *left -= 1;
        }
        let o = offset as usize;
        let n = buf.len();
        buf.as_mut_slice().copy_from_slice(&s.bytes[o..o + n]);
        Ok(buf)
    }

    fn durable_writes_refused(&self) -> Option<VolumeError> {
        self.lock().durability_lost.then(|| self.lost())
    }

    fn write_at(&self, buf: IoBuf, offset: u64, durable: bool) -> Result<IoBuf, VolumeError> {
        self.check(&buf, offset)?;
        let now = self.writing[0].fetch_add(1, Ordering::SeqCst) + 1;
        self.writing[1].fetch_max(now, Ordering::SeqCst);
        let _done = Writing(&self.writing[0]);
        let t = self.lock().write_time;
        std::thread::sleep(t);
        let mut s = self.lock();
        if durable && s.durability_lost {
            drop(s);
            return Err(self.lost());
        }
        let o = offset as usize;
        if let Some(left) = s.writes_left.as_mut() {
            if *left == 0 {
                return Err(VolumeError::Injected {
                    path: self.path.clone(),
                    what: "write failure",
                });
            }
            *left -= 1;
        }
        if let Some(prefix) = s.tear_at.take() {
            let k = prefix.min(buf.len());
            s.bytes[o..o + k].copy_from_slice(&buf.as_slice()[..k]);
            return Err(VolumeError::Injected {
                path: self.path.clone(),
                what: "torn write",
            });
        }
        s.bytes[o..o + buf.len()].copy_from_slice(buf.as_slice());
        Ok(buf)
    }

    fn sync(&self) -> Result<(), VolumeError> {
        if self.lock().durability_lost {
            return Err(self.lost());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Alignment = Alignment {
        offset: 512,
        mem: 512,
    };

    #[test]
    fn round_trip_and_refusals() {
        let v = MemVolume::new("mem0", 8192 + 100, A);
        assert_eq!(v.size(), 8192, "usable size rounds down");
        let mut b = v.alloc_buf(1024);
        b.as_mut_slice().fill(7);
        v.write_at(b, 512, true).unwrap();
        let r = v.read_at(v.alloc_buf(1024), 512).unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 7));
        let err = v.read_at(v.alloc_buf(1000), 0).unwrap_err();
        assert!(err.to_string().contains("mem0"), "{err}");
        assert!(v.write_at(v.alloc_buf(512), 8192, true).is_err());
    }

    #[test]
    fn torn_and_failed_writes() {
        let v = MemVolume::new("mem1", 4096, A);
        let mut b = v.alloc_buf(1024);
        b.as_mut_slice().fill(9);
        v.tear_next_write(512);
        assert!(v.write_at(b, 0, true).is_err());
        let img = v.image();
        assert!(img[..512].iter().all(|&x| x == 9) && img[512..1024].iter().all(|&x| x == 0));
        v.fail_writes_after(1);
        v.write_at(v.alloc_buf(512), 0, true).unwrap();
        assert!(v.write_at(v.alloc_buf(512), 0, true).is_err());
    }
}
