#!/usr/bin/env bash
# Installs the Debian packages that `make test` and `make demo` need, only when missing.
# Idempotent and quiet when everything is present. With --server, only what a server needs to
# build and run the two binaries (`make install`): no virtual card reader, test data or peers.
set -euo pipefail

server=(
  pkg-config          # pcsc crate build
  libpcsclite-dev     # pcsc crate link
  pcscd               # PC/SC daemon, for the patients' cards ([card])
  fuse3               # fusermount3, /etc/fuse.conf
)

packages=(
  pkg-config          # pcsc crate build
  libpcsclite-dev     # pcsc crate link
  pcscd               # PC/SC daemon (started by the test harness, never by systemd here)
  vsmartcard-vpcd     # virtual reader driver the virtual PIV card connects to
  pcsc-tools          # pcsc_scan, for operators
  fuse3               # fusermount3, /etc/fuse.conf
  samtools            # real CRAM writer/reader
  htslib-test         # real CRAM fixtures under /usr/share/htslib-test/test/
  fio                 # volume baseline in `qgenome-mountd bench`
  libgfshare-bin      # gfsplit, the sharing peer baseline in `qgenome bench split`
  gocryptfs           # the encrypted-FUSE peer baseline in `qgenome bench e2e`
  iproute2 util-linux # ip netns, losetup
  e2fsprogs           # mkfs.ext4, for an index on a failing disk (mountd/tests/volumes.rs)
  systemd             # systemd-analyze verify of the units (tests/units.rs)
  python3             # readers with precise open flags and signal masks in tests/fs_mount.rs
)

if [ "${1:-}" = "--server" ]; then
  packages=("${server[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
