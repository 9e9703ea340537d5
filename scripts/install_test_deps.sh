#!/usr/bin/env bash
# Install what the test suite needs on a fresh machine: lmap with its test extra (pytest, openai,
# selenium, transformers, ...) and, for tests/test_webui.py, Debian's Chromium + chromedriver
# (selenium drives /usr/bin/chromium through /usr/bin/chromedriver; no browser is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e '.[test]'
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi
