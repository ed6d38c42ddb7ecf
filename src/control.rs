//! The mount's control socket: how `qgenome consent ...`, `qgenome card ...` and
//! `qgenome status` reach a running mount (which holds the catalog open; sled allows one process).
//!
//! Protocol: one JSON object per line each way over a Unix socket created mode 0600 in the
//! state directory. A request is `{"cmd": "...", ...arguments}`; a reply is
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Each connection may send several
//! requests. Plaintext and key bytes never travel here. Only root and the mount's own user may
//! connect (checked by the peer's credentials); each request reaches the handlers with
//! `"peer": {"uid", "pid"}` set from them (whatever the client sent), for the audit.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// Answers one request. Returns `None` for a command it does not know, so handlers chain.
pub type Handler = dyn Fn(&Value) -> Option<Value> + Send + Sync;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error(
        "control socket {path}: {source} (is `qgenome mount` running with this state directory?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: bad reply: {reason}")]
    Reply { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
}

/// Error reply helper for handlers.
pub fn error(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

/// A string argument of a request, or an error reply naming it.
pub fn arg_str<'a>(req: &'a Value, key: &str) -> Result<&'a str, Value> {
    req.get(key).and_then(Value::as_str).ok_or_else(|| {
        error(format!(
            "request {:?}: missing string argument {key:?}",
            req["cmd"]
        ))
    })
}

/// Optional argument `key` of a request: absent (or null) is `None`; present, it must be a
/// string, else an error naming it (a wrong type must not fall back to a default).
pub fn opt_str<'a>(req: &'a Value, key: &str) -> Result<Option<&'a str>, Value> {
    optional(req, key, "a string", Value::as_str)
}

/// Optional whole-number argument `key`: absent (or null) is `None`; present, anything but a
/// whole number >= 0 is an error naming it.
pub fn opt_u64(req: &Value, key: &str) -> Result<Option<u64>, Value> {
    optional(req, key, "a whole number", Value::as_u64)
}

fn optional<'a, T>(
    req: &'a Value,
    key: &str,
    what: &str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>, Value> {
    match req.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v).map(Some).ok_or_else(|| {
            error(format!(
                "request {:?}: argument {key:?} must be {what}, not {v}",
                req["cmd"]
            ))
        }),
    }
}

/// Make way for a Unix socket at `path`: a socket an earlier run left there is removed. Any
/// other file is refused and left as it is (a mistyped path must not cost a file), and so is
/// a socket some live process still listens on.
pub fn clear_stale_socket(path: &Path) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::io::{Error, ErrorKind};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a file that is not a socket is there (left as it is: remove it, or choose another path)",
            ))
        }
        Ok(_) => {}
    }
    // Only a refused connection says nobody listens. Non-blocking: a live listener with a
    // full backlog answers EAGAIN instead of holding this start up.
    let probe = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(probe.as_raw_fd(), &UnixAddr::new(path)?) {
        Err(Errno::ECONNREFUSED) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Err(Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on it",
        )),
        Err(e) => Err(Error::new(
            Error::from(e).kind(),
            format!("cannot tell whether a process listens on it ({e}); left as it is"),
        )),
    }
}

/// Serve `handlers` (tried in order) on a socket at `path` from a background thread.
pub fn serve(path: &Path, handlers: Vec<Arc<Handler>>) -> std::io::Result<()> {
    use nix::sys::stat::{umask, Mode};
    clear_stale_socket(path)?;
    // Made 0600 from the start: a chmod after the bind leaves a moment in which another user
    // could connect, and keep the connection.
    let old = umask(Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let handlers = Arc::new(handlers);
    let me = nix::unistd::geteuid().as_raw();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let peer = match nix::sys::socket::getsockopt(
                    &conn,
                    nix::sys::socket::sockopt::PeerCredentials,
                ) {
                    Ok(c) if c.uid() == 0 || c.uid() == me => Peer {
                        uid: c.uid(),
                        pid: c.pid(),
                    },
                    Ok(c) => {
                        tracing::warn!(
                            "control socket: refused a connection from uid {} (pid {}): only root and uid {me} may use it",
                            c.uid(),
                            c.pid()
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("control socket: no peer credentials ({e}); connection refused");
                        continue;
                    }
                };
                let handlers = handlers.clone();
                // A thread the system refuses costs that one connection, not the socket: a
                // panic here would end this loop, and with it every later `consent revoke`.
                let spawned = std::thread::Builder::new()
                    .name("control-session".into())
                    .spawn(move || {
                        let _ = session(conn, peer, &handlers);
                    });
                if let Err(e) = spawned {
                    tracing::error!(
                        "control socket: no thread for a connection from uid {} (pid {}): {e}; connection dropped",
                        peer.uid,
                        peer.pid
                    );
                }
            }
        })?;
    Ok(())
}

/// Who is on the other end of a control connection (from `SO_PEERCRED`).
#[derive(Clone, Copy, Debug)]
struct Peer {
    uid: u32,
    pid: i32,
}

/// The caller of a request, as the control socket saw it: "uid U, pid P" (for the audit).
pub fn peer_of(req: &Value) -> String {
    match (req["peer"]["uid"].as_u64(), req["peer"]["pid"].as_i64()) {
        (Some(uid), Some(pid)) => format!("uid {uid}, pid {pid}"),
        _ => "caller unknown".into(),
    }
}

fn session(conn: UnixStream, peer: Peer, handlers: &[Arc<Handler>]) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).split(b'\n') {
        // serde_json reads bytes: a line that is not UTF-8 gets its error like any other.
        let line = line?;
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(mut req) => {
                if let Some(fields) = req.as_object_mut() {
                    fields.insert("peer".into(), json!({"uid": peer.uid, "pid": peer.pid}));
                }
                handlers
                    .iter()
                    .find_map(|h| h(&req))
                    .unwrap_or_else(|| error(format!("unknown command {:?}", req["cmd"])))
            }
            Err(e) => error(format!("request is not JSON: {e}")),
        };
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

/// Send one request and return the reply's fields, or its error as [`ControlError::Refused`].
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    // Consent waits and card exchanges answer within seconds; never hang a CLI forever.
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    writeln!(conn, "{req}").map_err(io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io)?;
    let reply: Value = serde_json::from_str(&line).map_err(|e| ControlError::Reply {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if reply["ok"] == json!(true) {
        Ok(reply)
    } else {
        Err(ControlError::Refused(
            reply["error"]
                .as_str()
                .unwrap_or("refused without a reason")
                .to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_nobody_listens_on_makes_way() {
        let dir = tempfile::tempdir().unwrap();
        // A file at a mistyped socket path is refused and kept.
        let file = dir.path().join("site.toml");
        std::fs::write(&file, "site = \"kept\"\n").unwrap();
        let err = clear_stale_socket(&file).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"site = \"kept\"\n");
        // A live listener's socket is refused and kept.
        let live = dir.path().join("live.sock");
        let listener = UnixListener::bind(&live).unwrap();
        let err = clear_stale_socket(&live).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        assert!(live.exists());
        // Once nobody listens, it is stale and goes; a missing path is fine.
        drop(listener);
        clear_stale_socket(&live).unwrap();
        assert!(!live.exists());
        clear_stale_socket(&live).unwrap();
    }

    /// An optional argument of the wrong type is an error naming it, never its default.
    #[test]
    fn optional_arguments_of_the_wrong_type_are_named() {
        let req = json!({"cmd": "x", "n": 5, "s": "v", "bad_n": "60", "bad_s": 1, "null": null});
        assert_eq!(opt_u64(&req, "n").unwrap(), Some(5));
        assert_eq!(opt_u64(&req, "absent").unwrap(), None);
        assert_eq!(opt_u64(&req, "null").unwrap(), None);
        let e = opt_u64(&req, "bad_n").unwrap_err();
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("\"bad_n\" must be a whole number"),
            "{e}"
        );
        assert_eq!(opt_str(&req, "s").unwrap(), Some("v"));
        assert_eq!(opt_str(&req, "absent").unwrap(), None);
        let e = opt_str(&req, "bad_s").unwrap_err();
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("\"bad_s\" must be a string"),
            "{e}"
        );
    }

    #[test]
    fn requests_reach_the_first_handler_that_knows_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let echo: Arc<Handler> = Arc::new(|req: &Value| {
            (req["cmd"] == "echo").then(|| json!({"ok": true, "said": req["text"]}))
        });
        let fail: Arc<Handler> =
            Arc::new(|req: &Value| (req["cmd"] == "fail").then(|| error("no such patient P9")));
        serve(&path, vec![echo, fail]).unwrap();
        let reply = request(&path, &json!({"cmd": "echo", "text": "hi"})).unwrap();
        assert_eq!(reply["said"], "hi");
        let err = request(&path, &json!({"cmd": "fail"})).unwrap_err();
        assert_eq!(err.to_string(), "no such patient P9");
        let err = request(&path, &json!({"cmd": "nope"})).unwrap_err();
        assert!(err.to_string().contains("unknown command"), "{err}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = request(&dir.path().join("absent.sock"), &json!({})).unwrap_err();
        assert!(err.to_string().contains("absent.sock"), "{err}");

        // A line that is not UTF-8 is answered with an error, and the session goes on.
        use std::io::{BufRead, Write};
        let mut conn = UnixStream::connect(&path).unwrap();
        conn.write_all(
            b"{\"cmd\": \"echo\", \"text\": \"\xff\"}\n{\"cmd\": \"echo\", \"text\": \"again\"}\n",
        )
        .unwrap();
        let mut replies = std::io::BufReader::new(conn).lines();
        let first: Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
        assert!(
            first["error"]
                .as_str()
                .is_some_and(|e| e.contains("request is not JSON")),
            "{first}"
        );
        let second: Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
        assert_eq!(second["said"], "again");
    }
}
