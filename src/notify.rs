//! systemd readiness (`sd_notify`): one datagram to `$NOTIFY_SOCKET`, nothing when unset.
use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. "READY=1") to the service manager. Returns false when
/// `$NOTIFY_SOCKET` is not set (not run under systemd with Type=notify).
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}
