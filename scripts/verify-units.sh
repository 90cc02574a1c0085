#!/usr/bin/env bash
# Checks contrib/systemd's units with `systemd-analyze verify` (from Debian's `systemd`
# package). The units name /usr/bin/gkm-*, as the package installs them; to check a source tree,
# pass the directory of built binaries: copies of the units point there instead.
#   scripts/verify-units.sh target/release
set -euo pipefail
cd "$(dirname "$0")/.."
bins=$(realpath "${1:-/usr/bin}")
if ! command -v systemd-analyze >/dev/null; then
    echo "verify-units: systemd-analyze is missing; install it: apt-get install systemd" >&2
    exit 1
fi
for b in gkm-server gkm-member; do
    [ -x "$bins/$b" ] || { echo "verify-units: no $bins/$b; build it first (cargo build --release --bins)" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in contrib/systemd/*.service; do
    sed "s|/usr/bin/|$bins/|g" "$unit" >"$tmp/$(basename "$unit")"
done
# A template is verified through an instance.
cp "$tmp/gkm-member@.service" "$tmp/gkm-member@demo.service"
cd "$tmp"
out=$(systemd-analyze verify --man=no ./gkm-server.service ./gkm-member@demo.service 2>&1) || {
    echo "$out" >&2
    echo "verify-units: systemd-analyze verify failed (above)" >&2
    exit 1
}
# verify exits 0 on some warnings: any line it prints is a finding.
if [ -n "$out" ]; then
    echo "$out" >&2
    echo "verify-units: systemd-analyze verify found the above" >&2
    exit 1
fi
echo "verify-units: gkm-server.service and gkm-member@.service verified"
