//! The request builder's rules, pure: which (offset, length, address) triples may reach the kernel.

/// What a volume requires of every request. Both values are powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// File offsets and lengths must be multiples of this (STATX_DIOALIGN offset / BLKSSZGET).
    pub offset: u32,
    /// Buffer addresses must be multiples of this (STATX_DIOALIGN memory alignment).
    pub mem: u32,
}

impl Alignment {
    /// Builds an alignment, refusing values that are zero or not powers of two.
    pub fn new(offset: u32, mem: u32) -> Option<Self> {
        (offset.is_power_of_two() && mem.is_power_of_two()).then_some(Self { offset, mem })
    }

    /// The larger of the two: a step that keeps both offset and address aligned.
    pub fn step(&self) -> u32 {
        self.offset.max(self.mem)
    }

    /// Rounds `n` down to a multiple of the offset alignment.
    pub fn floor(&self, n: u64) -> u64 {
        n & !(u64::from(self.offset) - 1)
    }

    /// Rounds `n` up to a multiple of the offset alignment.
    pub fn ceil(&self, n: u64) -> u64 {
        self.floor(n + u64::from(self.offset) - 1)
    }
}

/// The largest single request: the SQE length field is 32 bits; stay well inside it.
pub const MAX_REQUEST: usize = 1 << 30;

/// Why a request was refused before reaching the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("offset {offset} is not a multiple of {align}")]
    MisalignedOffset { offset: u64, align: u32 },
    #[error("length {len} is not a multiple of {align}")]
    MisalignedLength { len: usize, align: u32 },
    #[error("buffer address {addr:#x} is not a multiple of {align}")]
    MisalignedBuffer { addr: usize, align: u32 },
    #[error("empty request")]
    Empty,
    #[error("length {len} exceeds the largest single request ({MAX_REQUEST})")]
    TooLarge { len: usize },
    #[error("range {offset}+{len} runs past the end of the volume ({size})")]
    OutOfRange { offset: u64, len: usize, size: u64 },
}

/// Checks one request against the volume's alignment and size. Pure; every request passes here
/// before it is queued, so a misaligned request never reaches the kernel.
pub fn check_request(
    align: Alignment,
    size: u64,
    offset: u64,
    len: usize,
    addr: usize,
) -> Result<(), RequestError> {
    if len == 0 {
        return Err(RequestError::Empty);
    }
    if len > MAX_REQUEST {
        return Err(RequestError::TooLarge { len });
    }
    if !offset.is_multiple_of(u64::from(align.offset)) {
        return Err(RequestError::MisalignedOffset {
            offset,
            align: align.offset,
        });
    }
    if !len.is_multiple_of(align.offset as usize) {
        return Err(RequestError::MisalignedLength {
            len,
            align: align.offset,
        });
    }
    if !addr.is_multiple_of(align.mem as usize) {
        return Err(RequestError::MisalignedBuffer {
            addr,
            align: align.mem,
        });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RequestError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Alignment = Alignment {
        offset: 512,
        mem: 512,
    };

    #[test]
    fn aligned_request_passes() {
        assert_eq!(check_request(A, 1 << 20, 4096, 8192, 0x1000), Ok(()));
        assert_eq!(
            check_request(A, 1 << 20, (1 << 20) - 512, 512, 0x200),
            Ok(())
        );
    }

    #[test]
    fn each_misalignment_is_named() {
        assert_eq!(
            check_request(A, 1 << 20, 100, 512, 0x1000),
            Err(RequestError::MisalignedOffset {
                offset: 100,
                align: 512
            })
        );
        assert_eq!(
            check_request(A, 1 << 20, 0, 513, 0x1000),
            Err(RequestError::MisalignedLength {
                len: 513,
                align: 512
            })
        );
        assert_eq!(
            check_request(A, 1 << 20, 0, 512, 0x1001),
            Err(RequestError::MisalignedBuffer {
                addr: 0x1001,
                align: 512
            })
        );
        assert_eq!(
            check_request(A, 1 << 20, 0, 0, 0x1000),
            Err(RequestError::Empty)
        );
    }

    #[test]
    fn past_the_end_is_refused_even_when_size_is_unaligned() {
        // A volume of 10 MiB + 1234 bytes: its usable size is rounded down by the volume, but the
        // builder also refuses a request whose end crosses whatever size it is given.
        let size = 10 * 1024 * 1024 + 1234;
        let last = A.floor(size);
        assert_eq!(check_request(A, size, last - 512, 512, 0), Ok(()));
        assert!(matches!(
            check_request(A, size, last, 512, 0),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_request(A, u64::MAX, u64::MAX - 511, 512, 0),
            Err(RequestError::MisalignedOffset { .. }) | Err(RequestError::OutOfRange { .. })
        ));
    }

    #[test]
    fn alignment_rejects_non_powers_of_two() {
        assert!(Alignment::new(0, 512).is_none());
        assert!(Alignment::new(768, 512).is_none());
        assert_eq!(Alignment::new(4096, 512).map(|a| a.step()), Some(4096));
    }

    proptest! {
        #[test]
        fn accepted_requests_are_always_aligned_and_in_range(
            shift_o in 9u32..13, shift_m in 9u32..13,
            size in 0u64..(1 << 24), offset in 0u64..(1 << 24), len in 0usize..(1 << 16),
            addr in 0usize..(1 << 20),
        ) {
            let a = Alignment::new(1 << shift_o, 1 << shift_m).unwrap();
            if check_request(a, size, offset, len, addr).is_ok() {
                prop_assert_eq!(offset % u64::from(a.offset), 0);
                prop_assert_eq!(len % a.offset as usize, 0);
                prop_assert_eq!(addr % a.mem as usize, 0);
                prop_assert!(len > 0 && offset + len as u64 <= size);
            }
        }
    }
}
