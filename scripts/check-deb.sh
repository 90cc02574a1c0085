#!/usr/bin/env bash
# Checks a gkm .deb made by scripts/build-deb.sh: its control fields, conffiles, maintainer
# scripts and every path it must install, all owned by root.
#   scripts/check-deb.sh target/debian/gkm_*.deb
set -euo pipefail
deb=${1:?usage: scripts/check-deb.sh PACKAGE.deb}
fail() { echo "check-deb: $*" >&2; exit 1; }
info=$(dpkg-deb -I "$deb")
contents=$(dpkg-deb -c "$deb")
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = gkm ] || fail "Package is not gkm"
field Depends | grep -q 'libc6' || fail "Depends does not name libc6: $(field Depends)"
[ -n "$(field Version)" ] && [ -n "$(field Architecture)" ] && [ -n "$(field Description)" ] \
    || fail "Version, Architecture or Description missing"
for script in postinst prerm postrm conffiles; do
    grep -Eq "[[:space:]]$script([[:space:]]|\$)" <<<"$info" || fail "no DEBIAN/$script"
done
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
for conf in /etc/gkm/gkm-server.toml /etc/gkm/member.env.example; do
    grep -qx "$conf" <<<"$conffiles" || fail "$conf is not a conffile"
done
expect=(
    ./usr/bin/gkm-server ./usr/bin/gkmctl ./usr/bin/gkm-member ./usr/bin/gkm-demo
    ./lib/systemd/system/gkm-server.service ./lib/systemd/system/gkm-member@.service
    ./usr/lib/sysusers.d/gkm.conf
    ./etc/gkm/gkm-server.toml ./etc/gkm/member.env.example
    ./usr/share/doc/gkm/copyright
)
for b in gkm-server gkmctl gkm-member gkm-demo; do
    expect+=(
        "./usr/share/man/man1/$b.1.gz"
        "./usr/share/bash-completion/completions/$b"
        "./usr/share/zsh/vendor-completions/_$b"
        "./usr/share/fish/vendor_completions.d/$b.fish"
    )
done
for path in "${expect[@]}"; do
    awk '{print $6}' <<<"$contents" | grep -qxF "$path" || fail "the package lacks $path"
done
awk '$2 != "root/root" {print; bad=1} END {exit bad}' <<<"$contents" \
    || fail "files above are not owned by root/root"
awk '$6 ~ /^\.\/usr\/bin\/./ && $1 != "-rwxr-xr-x" {print; bad=1} END {exit bad}' <<<"$contents" \
    || fail "binaries above are not mode 0755"
# The default config is the daemon's own and loads.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
"$tmp/usr/bin/gkm-server" check-config --config "$tmp/etc/gkm/gkm-server.toml" \
    --state-dir "$tmp/state" >/dev/null || fail "the default config does not load"
zcat "$tmp/usr/share/man/man1/gkmctl.1.gz" | grep -q '^\.TH gkmctl' || fail "gkmctl.1.gz is not a man page"
echo "check-deb: $deb: $(awk 'END {print NR}' <<<"$contents") entries, Depends: $(field Depends); ok"
