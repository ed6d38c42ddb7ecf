//! `qgenome mount`: serve `/qgenome` until SIGTERM or SIGINT, then unmount cleanly.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use crate::config::HomeConfig;
use crate::sites::ShareSite;

#[derive(Debug, Args)]
pub struct MountArgs {
    #[arg(long, default_value = "/etc/qgenome/qgenome.toml")]
    pub config: PathBuf,
    /// Overrides the config's `mountpoint`.
    pub mountpoint: Option<PathBuf>,
}

/// The share sites of a config: share i on `cfg.sites[i]`; the home site over its Unix
/// socket, the others over their one-time-pad links.
pub fn build_sites(cfg: &HomeConfig) -> anyhow::Result<Vec<Arc<dyn ShareSite>>> {
    use crate::keys::End;
    use crate::sites::mountd::{LinkKeys, MountdSite};
    cfg.sites
        .iter()
        .map(|s| -> anyhow::Result<Arc<dyn ShareSite>> {
            Ok(
                match (&s.socket, &s.address, &s.link, &s.keys, s.end.as_deref()) {
                    (Some(sock), ..) => Arc::new(MountdSite::unix(&s.name, sock.clone())),
                    (None, Some(addr), Some(link), Some(dir), Some(end)) => {
                        let keys = LinkKeys {
                            dir: dir.clone(),
                            link: link.clone(),
                            end: if end == "a" { End::A } else { End::B },
                            options: crate::link::StreamOptions {
                                window: s.window_bytes().map_err(anyhow::Error::msg)?,
                            },
                        };
                        let site = MountdSite::tcp(&s.name, addr, &keys).with_context(|| {
                            format!("config {}: site {}", cfg.path.display(), s.name)
                        })?;
                        Arc::new(site)
                    }
                    _ => anyhow::bail!(
                        "config {}: site {} is incomplete",
                        cfg.path.display(),
                        s.name
                    ),
                },
            )
        })
        .collect()
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let cfg = HomeConfig::load(&args.config)?;
    let mountpoint = args
        .mountpoint
        .clone()
        .unwrap_or_else(|| cfg.mountpoint.clone());
    cfg.check_for_mount(&std::path::absolute(&mountpoint)?)?;
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // this one receives them in sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().context("blocking SIGTERM/SIGINT")?;
    crate::harden::harden_process("qgenome mount")?;
    let sites = build_sites(&cfg)?;
    let mounted = crate::fs::mount::start(&cfg, &mountpoint, sites, vec![])?;
    eprintln!(
        "qgenome: serving {} (control socket {})",
        mountpoint.display(),
        cfg.control_socket().display()
    );
    if let Err(e) = crate::notify::notify("READY=1") {
        tracing::warn!("cannot tell systemd the mount is ready ($NOTIFY_SOCKET): {e}");
    }
    // A stop signal, or the session ending under us (checked every second).
    loop {
        if let Some(sig) = wait_signal(&stop, Duration::from_secs(1))? {
            tracing::info!("{sig:?}: unmounting");
            let _ = crate::notify::notify("STOPPING=1");
            return mounted.unmount();
        }
        if mounted.session_ended() {
            let mp = mounted.mountpoint().display().to_string();
            // Every consent ends first, dropping the pages the kernel cached of the patients'
            // files: a mount detached while busy (`umount -l`) keeps its connection, and
            // mappings made under a consent would go on serving them.
            mounted.engine.consent.close();
            // Its audit entries kept (best effort: the catalog's disk may be what failed), and
            // the link key used so far destroyed (failures are logged).
            let _ = mounted.engine.catalog.flush();
            mounted.engine.flush_links();
            // Not unmounted on the way out: the path may hold another mount now, and a
            // detached one may still be held open. Exiting closes the FUSE connection, which
            // the kernel then aborts; every commit point already flushed the catalog.
            std::mem::forget(mounted);
            anyhow::bail!(
                "the FUSE mount at {mp} ended without a stop signal (unmounted by someone, or its kernel connection failed): {mp} is now a plain directory and nothing written there is stored; stopping"
            );
        }
    }
}

/// The signal of `set` (blocked in every thread) that arrives within `timeout`, if any.
fn wait_signal(set: &SigSet, timeout: Duration) -> anyhow::Result<Option<Signal>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid signal set, `ts` a valid timespec; no siginfo is asked for.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if n >= 0 {
        return Ok(Some(
            Signal::try_from(n).context("sigtimedwait returned an unknown signal")?,
        ));
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => Ok(None),
        e => Err(e).context("waiting for a stop signal"),
    }
}
