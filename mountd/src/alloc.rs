//! The extent allocator, pure: free space as a map of disjoint, coalesced ranges.
//!
//! It is never persisted. At open the free space is the complement of the live extents in the
//! index ([`Allocator::from_live`]), so space that belongs to an acknowledged share can never be
//! handed out again, whatever happened before a crash.

use std::collections::BTreeMap;

/// Why a set of live extents cannot describe a volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    #[error("extent {offset}+{len} overlaps extent {other_offset}+{other_len}")]
    Overlap {
        offset: u64,
        len: u64,
        other_offset: u64,
        other_len: u64,
    },
    #[error("extent {offset}+{len} lies outside the data area {start}..{end}")]
    OutOfRange {
        offset: u64,
        len: u64,
        start: u64,
        end: u64,
    },
    #[error("extent {offset}+{len} is not aligned to the allocation unit {unit}")]
    Misaligned { offset: u64, len: u64, unit: u64 },
}

/// Free space of the data area `start..end`, in multiples of `unit`.
#[derive(Debug, Clone)]
pub struct Allocator {
    start: u64,
    end: u64,
    unit: u64,
    /// start -> length of each free range; ranges are disjoint and never adjacent.
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
    /// Next-fit cursor: search from here so fresh space is used before just-freed space.
    cursor: u64,
}

impl Allocator {
    /// Everything between `start` and `end` free. `start`, `end` multiples of `unit`.
    pub fn new(start: u64, end: u64, unit: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        Self {
            start,
            end,
            unit,
            free,
            free_bytes: end.saturating_sub(start),
            cursor: start,
        }
    }

    /// The free space left by the live extents `(offset, len)`; refuses overlapping,
    /// misaligned or out-of-range extents (a corrupt index).
    pub fn from_live(
        start: u64,
        end: u64,
        unit: u64,
        live: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<Self, AllocError> {
        let mut live: Vec<(u64, u64)> = live.into_iter().collect();
        live.sort_unstable();
        let mut a = Self {
            start,
            end,
            unit,
            free: BTreeMap::new(),
            free_bytes: 0,
            cursor: start,
        };
        let mut pos = start;
        let mut prev: Option<(u64, u64)> = None;
        for (offset, len) in live {
            if offset % unit != 0 || len % unit != 0 || len == 0 {
                return Err(AllocError::Misaligned { offset, len, unit });
            }
            if offset < start || offset.checked_add(len).is_none_or(|e| e > end) {
                return Err(AllocError::OutOfRange {
                    offset,
                    len,
                    start,
                    end,
                });
            }
            if offset < pos {
                let (other_offset, other_len) = prev.unwrap_or((offset, len));
                return Err(AllocError::Overlap {
                    offset,
                    len,
                    other_offset,
                    other_len,
                });
            }
            if offset > pos {
                a.insert_free(pos, offset - pos);
            }
            pos = offset + len;
            a.cursor = pos;
            prev = Some((offset, len));
        }
        if end > pos {
            a.insert_free(pos, end - pos);
        }
        Ok(a)
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free.insert(offset, len);
        self.free_bytes += len;
    }

    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Bytes of the data area.
    pub fn capacity(&self) -> u64 {
        self.end - self.start
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Takes `len` bytes (a multiple of the unit), next-fit from the cursor; None when no free
    /// range is large enough.
    pub fn allocate(&mut self, len: u64) -> Option<u64> {
        debug_assert!(len > 0 && len.is_multiple_of(self.unit));
        let fits = |(&o, &l): (&u64, &u64)| (l >= len).then_some((o, l));
        let found = self
            .free
            .range(self.cursor..)
            .find_map(fits)
            .or_else(|| self.free.range(..self.cursor).find_map(fits))?;
        let (o, l) = found;
        self.free.remove(&o);
        if l > len {
            self.free.insert(o + len, l - len);
        }
        self.free_bytes -= len;
        self.cursor = o + len;
        Some(o)
    }

    /// Returns `offset..offset+len` to the free space, merging with its neighbours.
    pub fn free(&mut self, offset: u64, len: u64) {
        debug_assert!(offset.is_multiple_of(self.unit) && len.is_multiple_of(self.unit) && len > 0);
        debug_assert!(
            !self.is_free_overlap(offset, len),
            "double free of {offset}+{len}"
        );
        let mut start = offset;
        let mut total = len;
        if let Some((&po, &pl)) = self.free.range(..offset).next_back() {
            if po + pl == offset {
                self.free.remove(&po);
                start = po;
                total += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            total += nl;
        }
        self.free.insert(start, total);
        self.free_bytes += len;
    }

    fn is_free_overlap(&self, offset: u64, len: u64) -> bool {
        self.free
            .range(..offset + len)
            .next_back()
            .is_some_and(|(&o, &l)| o + l > offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fills_up_then_refuses_then_reuses() {
        let mut a = Allocator::new(4096, 4096 * 11, 4096);
        let xs: Vec<u64> = (0..5).map(|_| a.allocate(8192).unwrap()).collect();
        assert_eq!(xs, vec![4096, 12288, 20480, 28672, 36864]);
        assert_eq!(a.free_bytes(), 0);
        assert_eq!(a.allocate(4096), None);
        a.free(12288, 8192);
        a.free(20480, 8192);
        assert_eq!(a.largest_free(), 16384, "neighbours coalesce");
        assert_eq!(a.allocate(16384), Some(12288));
    }

    #[test]
    fn from_live_refuses_overlap_and_out_of_range() {
        let e = Allocator::from_live(0, 1 << 20, 4096, [(0, 8192), (4096, 4096)]).unwrap_err();
        assert!(matches!(e, AllocError::Overlap { offset: 4096, .. }), "{e}");
        let e = Allocator::from_live(4096, 1 << 20, 4096, [(0, 4096)]).unwrap_err();
        assert!(matches!(e, AllocError::OutOfRange { .. }));
        let e = Allocator::from_live(0, 1 << 20, 4096, [(100, 4096)]).unwrap_err();
        assert!(matches!(e, AllocError::Misaligned { .. }));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
    }

    proptest! {
        /// Against a model (one flag per unit): live extents never overlap, free bytes add up,
        /// and rebuilding from the live set gives the same free space.
        #[test]
        fn never_hands_out_live_space(ops in proptest::collection::vec(
            prop_oneof![(1u64..6).prop_map(Op::Alloc), any::<usize>().prop_map(Op::Free)], 1..200)) {
            let unit = 512u64;
            let units = 64u64;
            let mut a = Allocator::new(unit, unit * (units + 1), unit);
            let mut used = vec![false; units as usize + 1];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let len = n * unit;
                        match a.allocate(len) {
                            Some(o) => {
                                for u in o / unit..(o + len) / unit {
                                    prop_assert!(!used[u as usize], "unit {} handed out twice", u);
                                    used[u as usize] = true;
                                }
                                prop_assert!(o >= unit && o + len <= unit * (units + 1));
                                live.push((o, len));
                            }
                            None => prop_assert!(a.largest_free() < len),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (o, len) = live.swap_remove(i % live.len());
                        for u in o / unit..(o + len) / unit {
                            used[u as usize] = false;
                        }
                        a.free(o, len);
                    }
                    Op::Free(_) => {}
                }
                let used_bytes: u64 = live.iter().map(|x| x.1).sum();
                prop_assert_eq!(a.free_bytes() + used_bytes, a.capacity());
                let b = Allocator::from_live(unit, unit * (units + 1), unit, live.clone()).unwrap();
                prop_assert_eq!(b.free_bytes(), a.free_bytes());
                prop_assert_eq!(b.largest_free(), a.largest_free());
            }
        }
    }
}
