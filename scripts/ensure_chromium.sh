#!/usr/bin/env bash
# Make sure a headless Chromium is installed: the report test opens results/report/index.html in
# it. Safe to run again: it does nothing when `chromium` is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "cellbench: installing chromium (apt) for the report's browser test" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "cellbench: chromium is missing; install it (Debian: apt-get install chromium) to run the report test" >&2
  exit 1
fi
