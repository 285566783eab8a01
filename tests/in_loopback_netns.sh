#!/usr/bin/env bash
# Run a command in a fresh network namespace whose only interface is loopback, for every local Ray run
# (the serve tier, serve_load.py, manual tries): nothing it starts can reach or listen on another machine.
# Loopback also carries a stand-in "machine address" 10.254.0.1 with the default route through it, so
# Ray sees what it sees on a real host (a routable non-loopback address) and a listener that picks that
# address instead of 127.0.0.1 shows up in the tests. Needs root (or CAP_SYS_ADMIN) and iproute2;
# fails loudly rather than running the command outside the namespace.
#   tests/in_loopback_netns.sh python -m pytest -m serve
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
command -v unshare >/dev/null || { echo "in_loopback_netns: unshare (util-linux) is missing" >&2; exit 1; }
command -v ip >/dev/null || { echo "in_loopback_netns: ip (iproute2) is missing" >&2; exit 1; }
exec unshare -n -- bash -c '
set -euo pipefail
ip link set lo up
ip addr add 10.254.0.1/32 dev lo
ip route add default dev lo src 10.254.0.1
exec "$@"' in_loopback_netns "$@"
