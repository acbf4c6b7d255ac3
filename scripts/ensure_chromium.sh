#!/usr/bin/env bash
# Installs Debian's headless-capable `chromium` for the report's browser tests (tests/report/test_browser.py).
# Idempotent: does nothing when Chromium is already there, or when SAELAB_SKIP_BROWSER=1 (those tests then skip).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "${SAELAB_SKIP_BROWSER:-}" = "1" ]; then
    echo "ensure_chromium: SAELAB_SKIP_BROWSER=1, not installing chromium (browser tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: chromium is missing and there is no apt-get here; install Chromium yourself" \
         "or set SAELAB_SKIP_BROWSER=1 to skip the browser tests" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: chromium is missing and installing it needs root; run" \
             "'sudo apt-get install -y --no-install-recommends chromium' or set SAELAB_SKIP_BROWSER=1" >&2
        exit 1
    fi
fi
echo "ensure_chromium: installing chromium (once) for the report's browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
