#!/bin/sh
# tests/test_differential.py starts its own private nginx (foreground, own prefix and port) as the
# reference reverse proxy; make sure the binary exists.
set -eu
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "nginx not found: installing Debian's nginx-light package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
    # The package may start a system instance on port 80; the tests never use it.
    if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
        exit 0
    fi
fi
echo "error: the differential tests need an nginx binary (on PATH or /usr/sbin/nginx)." >&2
echo "       Install it (Debian/Ubuntu: sudo apt-get install nginx-light; macOS: brew install nginx) and re-run." >&2
exit 1
