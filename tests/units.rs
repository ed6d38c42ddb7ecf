//! The systemd units as shipped in `systemd/`: both load cleanly (`systemd-analyze verify`,
//! pointed at the binaries this build made), and the mount's unit never gets a mount
//! namespace of its own, in which its FUSE mount would be invisible to the host.
use std::path::{Path, PathBuf};
use std::process::Command;

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Key=Value` lines of the `[Service]` section.
fn service_settings(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// Settings that run the unit in a mount namespace of its own, from which mounts do not
/// propagate to the host (systemd.exec(5); `exec_needs_mount_namespace` in systemd), with
/// the values that leave it off.
const NAMESPACED: &[(&str, &[&str])] = &[
    ("PrivateTmp", &["no", "false"]),
    ("ProtectSystem", &["no", "false"]),
    ("ProtectHome", &["no", "false"]),
    ("PrivateDevices", &["no", "false"]),
    ("PrivateMounts", &["no", "false"]),
    ("PrivateNetwork", &["no", "false"]),
    ("PrivateIPC", &["no", "false"]),
    ("ProtectKernelTunables", &["no", "false"]),
    ("ProtectKernelModules", &["no", "false"]),
    ("ProtectKernelLogs", &["no", "false"]),
    ("ProtectControlGroups", &["no", "false"]),
    ("ProtectProc", &["default"]),
    ("ProcSubset", &["all"]),
    ("ReadWritePaths", &[""]),
    ("ReadOnlyPaths", &[""]),
    ("InaccessiblePaths", &[""]),
    ("ExecPaths", &[""]),
    ("NoExecPaths", &[""]),
    ("TemporaryFileSystem", &[""]),
    ("BindPaths", &[""]),
    ("BindReadOnlyPaths", &[""]),
    ("RootDirectory", &[""]),
    ("RootImage", &[""]),
    ("MountImages", &[""]),
    ("ExtensionImages", &[""]),
    ("ExtensionDirectories", &[""]),
    ("LogNamespace", &[""]),
    ("DynamicUser", &["no", "false"]),
    ("MountFlags", &["shared"]),
];

fn namespaced(text: &str) -> Vec<String> {
    service_settings(text)
        .into_iter()
        .filter(|(k, v)| {
            NAMESPACED
                .iter()
                .any(|(name, off)| name == k && !off.contains(&v.as_str()))
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

#[test]
fn the_mount_unit_mounts_in_the_hosts_namespace() {
    let found = namespaced(&unit("qgenome.service"));
    assert!(
        found.is_empty(),
        "qgenome.service would mount /qgenome in a namespace of its own, invisible to the host: {found:?}"
    );
    // The check itself sees such a setting.
    let bad = "[Service]\nExecStart=/bin/true\nPrivateTmp=yes\nProtectSystem=no\n";
    assert_eq!(namespaced(bad), ["PrivateTmp=yes"]);
}

/// Copies of the units whose commands are the binaries of this build, so that `verify`
/// checks the units as they are, not the install paths of this machine.
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_qgenome"));
    let bin_dir = format!("{}/", bin.parent().unwrap().display());
    assert!(
        Path::new(&bin_dir).join("qgenome-mountd").exists(),
        "qgenome-mountd is not built in {bin_dir} (run `cargo build --workspace` or `make test`)"
    );
    let mut out = Vec::new();
    for (file, instance) in [
        ("qgenome.service", "qgenome.service"),
        ("qgenome-mountd@.service", "qgenome-mountd@site1.service"),
    ] {
        let text = unit(file).replace("/usr/local/bin/", &bin_dir);
        std::fs::write(dir.join(file), text).unwrap();
        out.push(dir.join(instance));
    }
    out
}

#[test]
fn both_units_load_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    for path in units_here(dir.path()) {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian package systemd) runs");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{}: {}\n{said}",
            path.display(),
            out.status
        );
    }
}

/// Paths a site writes to (the README's `--state` for `qgenome-mountd`, and the site config
/// example's `state_dir`, `key_dir`, `volume` and `unix_socket`) lie where the site's unit
/// lets it write: under `ProtectSystem=strict` anything else is read-only, and the daemon
/// fails at start (the README once put site state under /var/lib/qgenome).
#[test]
fn the_documented_site_paths_are_writable_under_the_site_unit() {
    let settings = service_settings(&unit("qgenome-mountd@.service"));
    let writable: Vec<String> = settings
        .iter()
        .filter(|(k, _)| k == "ReadWritePaths")
        .flat_map(|(_, v)| {
            v.split_whitespace()
                .map(|p| p.trim_start_matches('-').to_string())
        })
        .chain(
            settings
                .iter()
                .filter(|(k, _)| k == "StateDirectory")
                .map(|(_, v)| format!("/var/lib/{v}")),
        )
        .collect();
    assert!(
        writable.iter().any(|p| p == "/var/lib/qgenome-mountd"),
        "{writable:?}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut paths: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with("qgenome-mountd "))
        .filter_map(|l| l.split("--state ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .collect();
    assert!(!paths.is_empty(), "the README gives no site --state path");
    let example = std::fs::read_to_string(root.join("mountd/src/config.rs")).unwrap();
    for key in ["state_dir", "key_dir", "volume", "unix_socket"] {
        let line = example
            .lines()
            .find(|l| l.starts_with(&format!("//! {key} = ")))
            .unwrap_or_else(|| panic!("no {key} in the site config example"));
        paths.push(line.split('"').nth(1).unwrap().to_string());
    }
    for p in &paths {
        assert!(
            writable.iter().any(|w| Path::new(p).starts_with(w)),
            "{p} (README or the site config example) is not writable under qgenome-mountd@.service: {writable:?}"
        );
    }
}

/// The mount tells systemd when /qgenome is really mounted (units that write there are
/// ordered after it); `qgenome mount` sends READY=1 (tests/e2e.rs waits for it).
#[test]
fn the_mount_unit_waits_for_readiness() {
    let settings = service_settings(&unit("qgenome.service"));
    assert!(
        settings.contains(&("Type".into(), "notify".into())),
        "{settings:?}"
    );
}

/// `make install-files` (what `make install` does after building) puts every file the README
/// names where it says, with the units pointed at `$(PREFIX)/bin`, the example configurations
/// beside the design notes, and the private directories made 0700.
#[test]
fn install_puts_binaries_units_examples_and_private_directories_in_place() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("target");
    for b in ["qgenome", "qgenome-mountd"] {
        let p = built.join("release").join(b);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("#!/bin/sh\necho {b}\n")).unwrap();
    }
    let dest = tmp.path().join("dest");
    let out = Command::new("make")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg("install-files")
        .arg(format!("TARGET_DIR={}", built.display()))
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("PREFIX=/opt/qg")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| {
        std::fs::metadata(dest.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    for b in ["opt/qg/bin/qgenome", "opt/qg/bin/qgenome-mountd"] {
        assert_eq!(mode(b), 0o755, "{b}");
    }
    for u in ["qgenome.service", "qgenome-mountd@.service"] {
        let text = std::fs::read_to_string(dest.join("etc/systemd/system").join(u)).unwrap();
        assert!(text.contains("ExecStart=/opt/qg/bin/"), "{u}: {text}");
        assert!(!text.contains("/usr/local/bin/"), "{u}");
    }
    for e in ["qgenome.toml", "site-home.toml", "site-sendai-1.toml"] {
        let p = format!("usr/share/doc/qgenome/examples/{e}");
        assert_eq!(
            std::fs::read(dest.join(&p)).unwrap(),
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("examples")
                    .join(e)
            )
            .unwrap(),
            "{p}"
        );
    }
    for d in ["etc/qgenome", "var/lib/qgenome", "var/lib/qgenome/keys"] {
        assert_eq!(mode(d), 0o700, "{d}");
    }
    assert!(dest.join("qgenome").is_dir());
}
