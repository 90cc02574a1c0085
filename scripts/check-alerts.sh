#!/usr/bin/env bash
# Checks contrib/prometheus/gkm-alerts.yml with promtool: the rules parse (`check rules`) and
# each alert fires on the series that should raise it (`test rules gkm-alerts.test.yml`).
# promtool comes from PATH, else from Debian's `prometheus` package, downloaded (not installed:
# the package would start a Prometheus server) and unpacked into target/promtool.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool=target/promtool/usr/bin/promtool
    if [ ! -x "$promtool" ]; then
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get download prometheus >/dev/null; }; }) \
            || { echo "check-alerts: cannot get promtool: install Debian's prometheus package" >&2; exit 1; }
        mkdir -p target/promtool
        dpkg-deb -x "$tmp"/prometheus_*.deb target/promtool
    fi
fi
promtool=$(realpath "$promtool")
"$promtool" check rules contrib/prometheus/gkm-alerts.yml
cd contrib/prometheus && "$promtool" test rules gkm-alerts.test.yml
