//! Keeping plaintext and key bytes out of swap and out of core dumps.
//!
//! Every command that holds such bytes in memory calls [`harden_process`] before it holds any:
//! `qgenome mount` (chunks, rebuilt plaintext, pads), `qgenome catalog rebuild` (pads and
//! rebuilt manifests), `qgenome keys provision` (the new key) and `qgenome-mountd serve` (pads
//! read with `pread`, one-time MAC keys and their powers).

/// A process that would hold plaintext or key bytes in memory that may be swapped to disk.
#[derive(Debug, thiserror::Error)]
#[error(
    "{process}: cannot lock its memory (mlockall: {source}) while swap is active ({swap}): \
     plaintext or key bytes could be written to disk. Run it as root or with CAP_IPC_LOCK and \
     LimitMEMLOCK=infinity (the shipped systemd units do), or turn swap off (swapoff -a)"
)]
pub struct SwapExposure {
    process: String,
    source: std::io::Error,
    swap: String,
}

/// Locks all of this process's memory, present and future, as it faults in
/// (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`), and makes it non-dumpable.
///
/// If the memory cannot be locked, the process may still run when no swap is active (nothing
/// can then page it out; a warning says so); with swap active, or when `/proc/swaps` cannot be
/// read, it must not: the error names the swap and the fix. A failure to make the process
/// non-dumpable only warns (`LimitCORE=0` in the units covers core files as well).
pub fn harden_process(process: &str) -> Result<(), SwapExposure> {
    // SAFETY: plain syscalls with constant arguments.
    let (locked, undumpable) = unsafe {
        (
            libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT),
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
        )
    };
    if undumpable != 0 {
        tracing::warn!(
            "{process}: prctl(PR_SET_DUMPABLE, 0) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    if locked == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    unlocked_memory_allowed(process, source, active_swaps())
}

/// The swap areas in use (`/proc/swaps`), by name.
pub fn active_swaps() -> std::io::Result<Vec<String>> {
    Ok(swap_names(&std::fs::read_to_string("/proc/swaps")?))
}

/// The names in the text of `/proc/swaps`: the first line is the column heads, each further
/// line one active swap area.
fn swap_names(swaps: &str) -> Vec<String> {
    swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether a process whose `mlockall` failed may run, given the swap areas in use.
fn unlocked_memory_allowed(
    process: &str,
    source: std::io::Error,
    swaps: std::io::Result<Vec<String>>,
) -> Result<(), SwapExposure> {
    let swap = match swaps {
        Ok(active) if active.is_empty() => {
            tracing::warn!(
                "{process}: memory is not locked (mlockall: {source}); no swap is active, so \
                 none of it can be paged out to disk"
            );
            return Ok(());
        }
        Ok(active) => active.join(", "),
        Err(e) => format!("/proc/swaps unreadable: {e}"),
    };
    Err(SwapExposure {
        process: process.to_string(),
        source,
        swap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: &str = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";

    fn refused() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EPERM)
    }

    #[test]
    fn unlocked_memory_runs_only_without_swap() {
        assert!(unlocked_memory_allowed("qgenome mount", refused(), Ok(vec![])).is_ok());

        let swaps = format!(
            "{HEADS}/dev/vda3                               partition\t8388604\t\t0\t\t-2\n\
             /swapfile                               file\t\t1048572\t\t0\t\t-3\n"
        );
        assert_eq!(swap_names(&swaps), ["/dev/vda3", "/swapfile"]);
        assert!(swap_names(HEADS).is_empty());
        assert!(swap_names("").is_empty());
        let e = unlocked_memory_allowed("qgenome-mountd", refused(), Ok(swap_names(&swaps)))
            .unwrap_err()
            .to_string();
        for needle in [
            "qgenome-mountd",
            "mlockall",
            "/dev/vda3, /swapfile",
            "CAP_IPC_LOCK",
            "swapoff",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }

        let unreadable = Err(std::io::Error::from_raw_os_error(libc::EACCES));
        let e = unlocked_memory_allowed("qgenome mount", refused(), unreadable)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/proc/swaps unreadable"), "{e}");
    }
}
