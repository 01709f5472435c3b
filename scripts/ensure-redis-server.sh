#!/bin/sh
# Tests start their own private redis-server; make sure the binary exists.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing Debian's redis-server package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # The package may start a system instance; the tests never use it.
    command -v redis-server >/dev/null 2>&1 && exit 0
fi
echo "error: the tests need a redis-server binary on PATH." >&2
echo "       Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) and re-run." >&2
exit 1
