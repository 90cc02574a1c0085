#!/usr/bin/env bash
# Builds the gkm Debian package: release binaries, systemd units, man pages, shell completions,
# a commented default config in /etc/gkm (conffiles). No cargo-deb: dpkg-deb does it.
#   scripts/build-deb.sh [OUT_DIR]        (default target/debian; prints the .deb's path last)
# Set GKM_DEB_NO_BUILD=1 to package the binaries already in $CARGO_TARGET_DIR/release.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
release=${CARGO_TARGET_DIR:-target}/release
for tool in dpkg-deb gzip; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing; apt-get install dpkg gzip" >&2; exit 1; }
done
if [ "${GKM_DEB_NO_BUILD:-}" != 1 ]; then
    cargo build --release --locked -p gkm-server -p gkm-member --bins
fi
bins=(gkm-server gkmctl gkm-member gkm-demo)
for b in "${bins[@]}"; do
    [ -x "$release/$b" ] || { echo "build-deb: no $release/$b; build it (cargo build --release --bins)" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
    "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d" \
    "$root/etc/gkm" "$root/usr/share/doc/gkm"

for b in "${bins[@]}"; do
    install -m 0755 "$release/$b" "$root/usr/bin/$b"
    # The release profile keeps line tables for backtraces; the package ships without them.
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/$b"; fi
done
install -m 0644 contrib/systemd/gkm-server.service contrib/systemd/gkm-member@.service \
    "$root/lib/systemd/system/"
install -m 0644 contrib/systemd/gkm.sysusers "$root/usr/lib/sysusers.d/gkm.conf"
for page in contrib/man/*.1; do
    gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
done
install -m 0644 contrib/completions/bash/* "$root/usr/share/bash-completion/completions/"
install -m 0644 contrib/completions/zsh/* "$root/usr/share/zsh/vendor-completions/"
install -m 0644 contrib/completions/fish/* "$root/usr/share/fish/vendor_completions.d/"

# The default config: the commented file `gkm-server init` writes, for the service's paths.
init=$stage/init
"$release/gkm-server" init --state-dir "$init" >/dev/null 2>&1
{
    echo "# /etc/gkm/gkm-server.toml: read by gkm-server.service (systemctl reload gkm-server"
    echo "# applies the settings that may change at run time; the journal says what changed)."
    echo "# Check it with: gkm-server check-config --config /etc/gkm/gkm-server.toml"
    echo
    cat "$init/gkm-server.toml"
} >"$root/etc/gkm/gkm-server.toml"
chmod 0644 "$root/etc/gkm/gkm-server.toml"
cat >"$root/etc/gkm/member.env.example" <<'ENV'
# Copy to /etc/gkm/member-GROUP.env for gkm-member@GROUP.service (systemctl enable --now
# gkm-member@GROUP). The controller's public key is the line `gkm-server init` printed, also in
# /etc/gkm/controller.pub on the controller's host. Repeat --controller for each controller of
# a highly available group. See gkm-member-run(1) for every option.
GKM_MEMBER_ARGS="--controller 127.0.0.1:47700 --controller-key 0000000000000000000000000000000000000000000000000000000000000000"
ENV
chmod 0644 "$root/etc/gkm/member.env.example"

install -m 0644 README.md "$root/usr/share/doc/gkm/README.md"
[ -f RFC-notes/operations.md ] && install -m 0644 RFC-notes/operations.md "$root/usr/share/doc/gkm/operations.md"
gzip -9n "$root/usr/share/doc/gkm/README.md"
[ -f "$root/usr/share/doc/gkm/operations.md" ] && gzip -9n "$root/usr/share/doc/gkm/operations.md"
cat >"$root/usr/share/doc/gkm/copyright" <<'COPY'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: gkm
Comment: Group key management (RFC 4046): the controller gkm-server, its client gkmctl, the
 member agent gkm-member and the demonstration gkm-demo. The binaries link Rust crates from
 crates.io under their own licenses (MIT, Apache-2.0, BSD, ISC, Unicode-3.0, Zlib, CC0-1.0);
 Cargo.lock in the source names each one and its version.

Files: *
Copyright: the gkm developers
License: Apache-2.0 or MIT

License: Apache-2.0
 On Debian systems, the complete text of the Apache License, Version 2.0, is in
 /usr/share/common-licenses/Apache-2.0.

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of this software
 and associated documentation files (the "Software"), to deal in the Software without
 restriction, including without limitation the rights to use, copy, modify, merge, publish,
 distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
 Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies or
 substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
 BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
 NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
 DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
COPY

# Shared-library dependencies, as dpkg-shlibdeps finds them (it wants a debian/control).
depends="libc6"
if command -v dpkg-shlibdeps >/dev/null; then
    mkdir -p "$stage/debian"
    printf 'Source: gkm\n\nPackage: gkm\nArchitecture: any\n' >"$stage/debian/control"
    found=$(cd "$stage" && dpkg-shlibdeps -O -e"root/usr/bin/gkm-server" -e"root/usr/bin/gkmctl" \
        -e"root/usr/bin/gkm-member" -e"root/usr/bin/gkm-demo" 2>/dev/null \
        | sed -n 's/^shlibs:Depends=//p')
    [ -n "$found" ] && depends=$found
    rm -rf "$stage/debian"
fi
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: gkm
Version: $version
Architecture: $arch
Maintainer: gkm developers <gkm@localhost>
Installed-Size: $size
Depends: $depends, passwd
Section: net
Priority: optional
Description: group key management (RFC 4046): controller, member agent and tools
 gkm keeps a group's key shared by exactly its current members: gkm-server, the group
 controller (key server), rekeys the group with logical key hierarchy (LKH) rekeys signed
 with Ed25519 and sent by multicast; gkm-member, the member agent, registers (HPKE),
 follows the rekeys and hands the group's traffic key to local applications; gkmctl
 controls a running gkm-server; gkm-demo runs a whole group on this machine and checks it.
 Hardened systemd units, man pages and shell completions are included.
CONTROL
printf '/etc/gkm/gkm-server.toml\n/etc/gkm/member.env.example\n' >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
# Makes the gkm system user and, once, the controller's keys as systemd credentials.
set -e
if [ "$1" = configure ]; then
    if ! getent passwd gkm >/dev/null; then
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers gkm.conf
        else
            useradd --system --user-group --home-dir /nonexistent --no-create-home \
                --shell /usr/sbin/nologin --comment "gkm group key management" gkm
        fi
    fi
    install -d -m 0700 /etc/gkm/credentials
    if [ ! -e /etc/gkm/credentials/controller.key ]; then
        tmp=$(mktemp -d)
        gkm-server init --state-dir "$tmp/state" \
            --storage-key-file /etc/gkm/credentials/storage.key >/etc/gkm/controller.pub 2>/dev/null
        mv "$tmp/state/controller.key" /etc/gkm/credentials/controller.key
        rm -rf "$tmp"
        echo "gkm: made the controller's keys in /etc/gkm/credentials; its public key (members' --controller-key) is in /etc/gkm/controller.pub"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
POSTINST
cat >"$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop gkm-server.service 'gkm-member@*.service' >/dev/null 2>&1 || true
fi
PRERM
cat >"$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
# The keys in /etc/gkm/credentials and the state in /var/lib/gkm-* stay, also on purge:
# deleting the storage key destroys every group it seals. Remove them by hand.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb=$out/gkm_${version}_${arch}.deb
dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
echo "$deb"
