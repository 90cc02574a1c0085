#!/usr/bin/env bash
# Soak run of the kill -9 test (GKM-V030..V032, gkm-server/tests/crash.rs) in release mode:
# KILLS SIGKILLs of the real controller (default 200) at random moments during
# max(1000, 20 x KILLS) membership operations of ~20 real member daemons on loopback.
#
#   scripts/soak.sh [KILLS] [SEED]
#
# The test reads GKM_SOAK_KILLS (CI runs it with the default, 50) and GKM_CRASH_SEED (default
# 2026; another seed gives another schedule of operations and kills). Its last line reports the
# kills, operations, wraps checked and restart times.
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-200}"
seed="${2:-2026}"
# The test starts target/release/gkm-member, built next to it.
cargo build --release --locked -p gkm-member
GKM_SOAK_KILLS="$kills" GKM_CRASH_SEED="$seed" \
    cargo test --release --locked -p gkm-server --test crash -- --nocapture
