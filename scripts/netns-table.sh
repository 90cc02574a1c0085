#!/usr/bin/env bash
# The loss/resync table of the multi-host tests: every loss pattern (0%, 5%, 20% random, bursts)
# with each repeat count, 1,000 joins, leaves and evictions each, one table row per run.
#   sudo scripts/netns-table.sh ["REPEATS..."] [OPS]      e.g. scripts/netns-table.sh "1 2 3" 1000
# Needs root, iproute2 and nftables (see gkm-server/tests/netns.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export GKM_NETNS_REPEATS=${1:-1 2 3}
export GKM_NETNS_OPS=${2:-1000}
cargo build --locked --bins -q
cargo test --locked -q -p gkm-server --test netns -- --nocapture --test-threads 1 2>&1 \
    | grep -oE '(netns row|skipped).*|.*(FAILED|panicked).*' || true
