//! `qgenome demo` cleans up on Ctrl-C (SIGINT) and `kill` (SIGTERM) whenever they come: here
//! while its deployment is still starting (a site up, the mount not yet), the moment at which
//! it used to know of pcscd alone and left the site daemons running.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The demo directory `qgenome-demo-*` made under `parent`, once there is one.
fn demo_dir(parent: &Path) -> Option<PathBuf> {
    std::fs::read_dir(parent)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qgenome-demo-"))
        })
}

/// Pids of the processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then_some((pid, cmd))
        })
        .collect()
}

fn interrupted_while_starting(sig: nix::sys::signal::Signal) {
    let parent = tempfile::Builder::new()
        .prefix("qgenome-demo-interrupt-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args(["demo", "--cram-size", "8M", "--dir"])
        .arg(parent.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the second site's daemon is serving: the deployment is part-way up.
    let t = Instant::now();
    let dir = loop {
        if let Some(d) = demo_dir(parent.path()) {
            let log = d.join("deploy/site1/mountd.log");
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on")) {
                break d;
            }
        }
        if let Some(st) = demo.try_wait().unwrap() {
            panic!("the demo ended before its sites started: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no site of the demo started in 180 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !processes_naming(&dir).is_empty(),
        "the site daemons run with the demo's directory in their command line"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.id() as i32), sig).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = demo.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the demo did not exit within 60 s of {sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(demo.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: cleaning up"), "{err}");
    // The daemons were stopped (SIGKILL at the latest, half a second after SIGTERM), the
    // directory removed, and nothing is mounted on it.
    let t = Instant::now();
    while !processes_naming(&dir).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = processes_naming(&dir);
    for (pid, _) in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(left.is_empty(), "left running after {sig}: {left:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "still mounted under {}",
        dir.display()
    );
}

/// Ctrl-C, then `kill`, one demo after the other (two at once would share one pcscd, which
/// the first to be stopped would take down).
#[test]
fn a_demo_interrupted_or_killed_while_its_sites_start_stops_them() {
    interrupted_while_starting(nix::sys::signal::Signal::SIGINT);
    interrupted_while_starting(nix::sys::signal::Signal::SIGTERM);
}
