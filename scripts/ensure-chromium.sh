#!/bin/sh
# tests/test_client_browser.py drives a headless Chromium through chromedriver (selenium); make sure
# both binaries exist. Debian's packages only: no browser is downloaded at test time.
set -eu
have() {
    { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; } &&
        { command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ]; }
}
if have; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium or chromedriver not found: installing Debian's chromium and chromium-driver packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    if have; then
        exit 0
    fi
fi
echo "error: the browser test needs chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)." >&2
echo "       Install them (Debian: sudo apt-get install chromium chromium-driver) and re-run;" >&2
echo "       without them tests/test_client_browser.py is skipped." >&2
exit 1
