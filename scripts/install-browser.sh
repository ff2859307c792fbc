#!/bin/sh
# Headless Chromium for the browser tests (tests/test_pages.py and the QC-decision test drive the HTML pages
# in it through Playwright). Uses a Chromium that is already installed; otherwise installs the OS package when
# this user may (root, or password-less sudo) on Debian/Ubuntu. Anything else: say what to do and carry on
# (the browser tests then skip, naming the reason).
set -u
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: no Chromium and no permission to install it: run 'apt-get install chromium' as root" >&2
        exit 0
    fi
    # one retry: a fresh machine's package lists may be stale
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || {
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    } || echo "install-browser: apt-get install chromium failed; the browser tests will skip" >&2
else
    echo "install-browser: no Chromium found; install it (or set ATLAS_CURATE_BROWSER) for the browser tests" >&2
fi
exit 0
