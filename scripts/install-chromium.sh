#!/usr/bin/env bash
# Install Debian's headless-capable Chromium (and a font) for the browser test of the HTML report.
#
# Idempotent: exits 0 at once when /usr/bin/chromium is already there. Needs root, or sudo without
# a password prompt; otherwise it fails with a message saying so. Debian/Ubuntu (apt-get) only.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "install-chromium: $CHROMIUM already installed" >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: apt-get not found; install Chromium at $CHROMIUM by hand" >&2
    exit 1
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install-chromium: must run as root (or with passwordless sudo) to apt-get install" \
        "chromium; run: sudo $0" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends chromium fonts-dejavu-core

if [[ ! -x "$CHROMIUM" ]]; then
    echo "install-chromium: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "install-chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)" \
    "in $(( $(date +%s) - start )) s" >&2
