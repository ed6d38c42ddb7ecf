//! Aligned I/O buffers: heap buffers from `aligned-vec`, or slots of a pool registered with the
//! ring (fixed buffers, which spare the kernel pinning pages on every request).

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use aligned_vec::{AVec, RuntimeAlign};

/// An aligned buffer that moves into a request and comes back with its completion.
pub struct IoBuf {
    inner: Inner,
    len: usize,
}

enum Inner {
    Heap(AVec<u8, RuntimeAlign>),
    /// Pages mapped for this buffer alone, unmapped when it is dropped.
    Mapped(memmap2::MmapMut),
    Fixed {
        pool: Arc<FixedPool>,
        index: u16,
    },
}

/// From this length on, a buffer outside the fixed pool is mapped for itself rather than taken
/// from the heap. glibc kept freed blocks of this size in the arena of the thread that made
/// them (its mmap threshold rises to the largest block freed): a site serving 16 MiB shares
/// grew by 128 MiB per eight GETs, to about 770 MB, whatever `max_inflight_bytes` said. Fixing
/// the threshold for the whole process instead (`mallopt`) cost 1–11% of e2e CPU per byte:
/// other large blocks are allocated and freed often there.
pub const MAPPED_FROM: usize = 2 << 20;

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

impl IoBuf {
    /// A zero-filled heap buffer of `len` bytes whose address is a multiple of `align`; from
    /// [`MAPPED_FROM`] bytes on, pages mapped for it alone (zeroed by the kernel) when
    /// `align` divides the page size.
    pub fn heap(align: usize, len: usize) -> Self {
        if len >= MAPPED_FROM && page_size().is_multiple_of(align) {
            if let Ok(m) = memmap2::MmapMut::map_anon(len) {
                return Self {
                    inner: Inner::Mapped(m),
                    len,
                };
            }
        }
        let mut v = AVec::<u8, RuntimeAlign>::with_capacity(align, len);
        v.resize(len, 0);
        Self {
            inner: Inner::Heap(v),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the pointer is valid for `len` bytes while `self` lives (heap: owned; fixed: a
        // slot of at least `len` bytes reserved for this buffer until it is dropped).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        match &self.inner {
            Inner::Heap(v) => v.as_ptr(),
            Inner::Mapped(m) => m.as_ptr(),
            Inner::Fixed { pool, index } => pool.slot_ptr(*index),
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.inner {
            Inner::Heap(v) => v.as_mut_ptr(),
            Inner::Mapped(m) => m.as_mut_ptr(),
            Inner::Fixed { pool, index } => pool.slot_ptr(*index),
        }
    }

    /// The registered-buffer index when this buffer is a slot of the ring's fixed pool.
    pub(crate) fn fixed_index(&self) -> Option<u16> {
        match &self.inner {
            Inner::Heap(_) | Inner::Mapped(_) => None,
            Inner::Fixed { index, .. } => Some(*index),
        }
    }

    /// Whether the buffer is a registered (fixed) slot; exposed for tests and benchmarks.
    pub fn is_fixed(&self) -> bool {
        self.fixed_index().is_some()
    }
}

impl fmt::Debug for IoBuf {
    // Never print the bytes: they may be share data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("fixed", &self.fixed_index())
            .finish_non_exhaustive()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Inner::Fixed { pool, index } = &self.inner {
            pool.release(*index);
        }
    }
}

/// One allocation cut into equal slots, registered with a ring as fixed buffers.
pub(crate) struct FixedPool {
    base: NonNull<u8>,
    layout: Layout,
    slot_len: usize,
    slots: u16,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the pool only hands out disjoint slots; each slot is accessed through the single IoBuf
// that holds its index, and the free list is behind a mutex.
unsafe impl Send for FixedPool {}
unsafe impl Sync for FixedPool {}

impl FixedPool {
    /// `slots` slots of `slot_len` bytes each (rounded up to `align`), every slot aligned.
    pub(crate) fn new(slots: u16, slot_len: usize, align: usize) -> Option<Arc<Self>> {
        let slot_len = slot_len.div_ceil(align) * align;
        let total = slot_len.checked_mul(usize::from(slots))?;
        if total == 0 {
            return None;
        }
        let layout = Layout::from_size_align(total, align).ok()?;
        // SAFETY: layout has a non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Arc::new(Self {
            base,
            layout,
            slot_len,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
        }))
    }

    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .map(|i| libc::iovec {
                iov_base: self.slot_ptr(i).cast(),
                iov_len: self.slot_len,
            })
            .collect()
    }

    fn slot_ptr(&self, index: u16) -> *mut u8 {
        // SAFETY: index < slots, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(usize::from(index) * self.slot_len) }
    }

    /// A zero-filled slot of `len` bytes, if one is free and large enough.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        let mut buf = self.take_dirty(len)?;
        buf.as_mut_slice().fill(0);
        Some(buf)
    }

    /// A slot of `len` bytes holding whatever its last request left there.
    pub(crate) fn take_dirty(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        if len == 0 || len > self.slot_len {
            return None;
        }
        let index = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(IoBuf {
            inner: Inner::Fixed {
                pool: Arc::clone(self),
                index,
            },
            len,
        })
    }

    fn release(&self, index: u16) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
    }
}

impl Drop for FixedPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every IoBuf holds an Arc, so none is alive.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        for align in [512usize, 4096] {
            for len in [3 * align, MAPPED_FROM - align, MAPPED_FROM + 3 * align] {
                let mut b = IoBuf::heap(align, len);
                assert_eq!(b.as_ptr() as usize % align, 0);
                assert_eq!(b.len(), len);
                assert!(b.as_slice().iter().all(|&x| x == 0));
                assert!(!b.is_fixed());
                assert_eq!(matches!(b.inner, Inner::Mapped(_)), len >= MAPPED_FROM);
                b.as_mut_slice()[len - 1] = 7;
                assert_eq!(b.as_slice()[len - 1], 7);
            }
        }
    }

    #[test]
    fn pool_slots_are_disjoint_returned_and_rezeroed() {
        let pool = FixedPool::new(2, 4096, 4096).unwrap();
        let mut a = pool.take(4096).unwrap();
        let b = pool.take(100).unwrap();
        assert!(pool.take(10).is_none(), "only two slots");
        assert_ne!(a.fixed_index(), b.fixed_index());
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        a.as_mut_slice().fill(0xAB);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        drop(a);
        let c = pool.take(4096).unwrap();
        assert!(
            c.as_slice().iter().all(|&x| x == 0),
            "a reused slot comes back zeroed"
        );
        assert!(pool.take(8192).is_none(), "larger than a slot");
        assert!(format!("{c:?}").contains("len"));
    }
}
