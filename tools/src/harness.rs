//! Harness for tests on the real PC/SC stack: `pcscd --foreground` with the vpcd driver and the
//! `qgenome-vcard` binary as the card. One pcscd per host and fixed vpcd ports, so every user
//! takes [`CardTestLock`] first. Every process started here is stopped by its guard's Drop.
//!
//! Only std, libc and thiserror, so tests of other packages can include it with `#[path]`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the harness could not set the stack up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout { what: String, waited_ms: u64 },
    #[error("{what} exited early with {status}; log {log}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("port {port} is already in use before {what} started (another pcscd with vpcd?)")]
    PortBusy { port: u16, what: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// An exclusive lock serializing all tests that use pcscd and the vpcd ports.
pub struct CardTestLock {
    _file: File,
}

impl CardTestLock {
    pub const PATH: &'static str = "/tmp/qgenome-card-tests.lock";

    /// Blocks until no other card test holds the lock.
    pub fn acquire() -> Result<CardTestLock, HarnessError> {
        use std::os::fd::AsRawFd;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::PATH)
            .map_err(io_err(format!("open {}", Self::PATH)))?;
        // SAFETY: flock on a descriptor we own; blocks until exclusive.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(HarnessError::Io {
                what: format!("flock {}", Self::PATH),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(CardTestLock { _file: file })
    }
}

/// Whether something listens on TCP `port`, asked of `ss` (never by connecting: a connection
/// to vpcd would count as a card).
pub fn port_listening(port: u16) -> Result<bool, HarnessError> {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .map_err(io_err("run ss -ltn (iproute2)"))?;
    Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
}

/// Polls `check` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, HarnessError>,
) -> Result<(), HarnessError> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                waited_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Stops a child: SIGTERM, then SIGKILL if it lingers; always reaps it.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child, libc::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio), HarnessError> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("open log {}", path.display())))?;
    let g = f
        .try_clone()
        .map_err(io_err(format!("dup log {}", path.display())))?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// `pcscd --foreground`, stopped on drop.
pub struct Pcscd {
    child: Child,
    log: PathBuf,
}

impl Pcscd {
    /// Starts pcscd and waits until vpcd listens on `vpcd_port`.
    pub fn start(log: &Path, vpcd_port: u16) -> Result<Pcscd, HarnessError> {
        if port_listening(vpcd_port)? {
            return Err(HarnessError::PortBusy {
                port: vpcd_port,
                what: "pcscd".into(),
            });
        }
        let (out, err) = log_file(log)?;
        let child = Command::new("pcscd")
            .args(["--foreground", "--debug"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err("spawn pcscd --foreground (Debian package pcscd)"))?;
        let mut p = Pcscd {
            child,
            log: log.to_owned(),
        };
        let what = format!("pcscd's vpcd port {vpcd_port}");
        wait_until(&what, Duration::from_secs(10), || {
            if let Some(status) = p.child.try_wait().map_err(io_err("wait pcscd"))? {
                return Err(HarnessError::Exited {
                    what: "pcscd".into(),
                    status,
                    log: p.log.clone(),
                });
            }
            port_listening(vpcd_port)
        })?;
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no cleanup by pcscd itself (what a crash looks like to clients).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// A `qgenome-vcard` process, stopped on drop.
pub struct Vcard {
    child: Child,
    log: PathBuf,
}

impl Vcard {
    pub fn start(bin: &Path, args: &[&str], log: &Path) -> Result<Vcard, HarnessError> {
        let (out, err) = log_file(log)?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("spawn {}", bin.display())))?;
        Ok(Vcard {
            child,
            log: log.to_owned(),
        })
    }

    /// Exit status if it has exited.
    pub fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        self.child.try_wait().map_err(io_err(format!(
            "wait qgenome-vcard (log {})",
            self.log.display()
        )))
    }
}

impl Drop for Vcard {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(2));
    }
}
