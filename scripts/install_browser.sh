#!/bin/sh
# Debian's Chromium for the web page's end-to-end test (tests/test_ui_browser.py), driven by
# Playwright's Python package through /usr/bin/chromium: no browser is downloaded by a test tool.
# Needs root (or sudo) and apt; where neither is available the test skips and says why.
set -e
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install Chromium yourself to run the browser test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "install_browser: not root and no sudo; the browser test will skip" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_browser: installing Debian's chromium (once)"
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || echo "install_browser: apt-get could not install chromium; the browser test will skip" >&2
