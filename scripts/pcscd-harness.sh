#!/usr/bin/env bash
# Starts the development card stack by hand: pcscd in the foreground (debug log) and the virtual
# PIV card, so pcsc_scan / scriptor / `qgenome` can talk to "Virtual PCD 00 00".
# Usage: scripts/pcscd-harness.sh [qgenome-vcard options...]   (Ctrl-C stops both)
# Needs root and the packages of scripts/install-deps.sh. Never on a production host: vpcd
# listens on all interfaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
target="${CARGO_TARGET_DIR:-target}"
cargo build -q -p qgenome-tools --bin qgenome-vcard
if ss -ltnH 'sport = :35963' | grep -q .; then
  echo "port 35963 already in use: another pcscd with vpcd is running" >&2
  exit 1
fi
log="$(mktemp -d)"
pcscd --foreground --debug >"$log/pcscd.log" 2>&1 &
pcscd_pid=$!
trap 'kill "$pcscd_pid" ${vcard_pid:+"$vcard_pid"} 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 100); do
  ss -ltnH 'sport = :35963' | grep -q . && break
  sleep 0.1
done
ss -ltnH 'sport = :35963' | grep -q . || { echo "pcscd did not open vpcd's port; log $log/pcscd.log" >&2; exit 1; }
"$target/debug/qgenome-vcard" "$@" &
vcard_pid=$!
echo "pcscd pid $pcscd_pid (log $log/pcscd.log), qgenome-vcard pid $vcard_pid; Ctrl-C to stop"
wait "$vcard_pid"
