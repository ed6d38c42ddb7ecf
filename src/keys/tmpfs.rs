//! A private tmpfs with transparent huge pages, for key pools kept in RAM.
//!
//! Every sealed or opened byte reads its pad from the pool and then destroys it (punches it
//! out). On a tmpfs of 4 KiB pages both cost a page-cache lookup, copy and free per 4 KiB; on a
//! tmpfs mounted with `huge=always` they work on 2 MiB folios. Measured on this project's
//! 2-core machine (pread then punch of a 1 GiB pool in ~1 MiB frames): 0.31–0.34 s of CPU
//! with 4 KiB pages, 0.09–0.10 s with huge pages. Deployments that keep pools in RAM should
//! mount their pool directory this way (see docs/design.md); the benchmarks do it for their
//! own pools when they run as root.
use std::path::{Path, PathBuf};

/// A tmpfs mounted over a directory; unmounted (lazily) when dropped.
#[derive(Debug)]
pub struct HugeTmpfs {
    dir: PathBuf,
}

impl HugeTmpfs {
    /// Mount a tmpfs of at most `size` bytes (rounded up to 1 MiB), mode 0700, whose files use
    /// huge pages, over the existing directory `dir`. Fails without CAP_SYS_ADMIN.
    pub fn mount(dir: &Path, size: u64) -> std::io::Result<Self> {
        use nix::mount::{mount, MsFlags};
        let size = size.div_ceil(1 << 20).max(1);
        let data = format!("size={size}m,huge=always,mode=0700");
        let with = |extra: &str| {
            mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(format!("{data}{extra}").as_str()),
            )
        };
        let failed = |e: nix::Error| {
            std::io::Error::other(format!(
                "mounting a tmpfs with huge pages on {}: {e}",
                dir.display()
            ))
        };
        // `noswap` (Linux 6.4+): key pages never go to a swap device, where a punch would
        // free their slot without overwriting it.
        match with(",noswap") {
            Ok(()) => {}
            Err(nix::Error::EINVAL) => {
                let swaps = crate::harden::active_swaps()?;
                if !swaps.is_empty() {
                    return Err(std::io::Error::other(format!(
                        "mounting a tmpfs for key pools on {}: this kernel has no tmpfs `noswap` \
                         (Linux 6.4+) and swap is active ({}): used key could stay on the swap \
                         device; turn swap off or keep the pools on disk",
                        dir.display(),
                        swaps.join(", ")
                    )));
                }
                with("").map_err(failed)?;
            }
            Err(e) => return Err(failed(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// [`mount`](Self::mount) over `dir` when `dir` is on tmpfs (pools in RAM), else `None`;
    /// a failure is logged and also gives `None` (the pools then use 4 KiB pages).
    pub fn over_tmpfs(dir: &Path, size: u64) -> Option<Self> {
        if !is_tmpfs(dir) {
            return None;
        }
        Self::mount(dir, size)
            .map_err(|e| tracing::warn!("key pools stay on 4 KiB pages: {e}"))
            .ok()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Whether `path` is on a tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting the tmpfs on {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, as `make test` runs; the files of the mount use huge pages.
    #[test]
    fn files_on_the_mount_use_huge_pages_and_vanish_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let fs = HugeTmpfs::mount(dir.path(), 64 << 20).expect("mount (tests run as root)");
        let st = nix::sys::statfs::statfs(fs.path()).unwrap();
        assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        let opts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = opts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(dir.path().to_str().unwrap()))
            .expect("the mount is listed");
        assert!(line.contains("huge=always"), "{line}");
        // This kernel (6.18) has tmpfs `noswap`: key pages never reach a swap device.
        assert!(line.contains("noswap"), "{line}");
        std::fs::write(fs.path().join("pool"), vec![7u8; 4 << 20]).unwrap();
        drop(fs);
        assert!(
            !dir.path().join("pool").exists(),
            "the mount's files outlived it"
        );
    }
}
