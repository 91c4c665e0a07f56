#!/usr/bin/env bash
# Make sure a Docker daemon answers. On a root Debian machine without one, install docker.io
# and start dockerd in the background; anywhere else, say what to do and fail.
set -euo pipefail

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "cellbench: no Docker daemon answers; start one (e.g. 'sudo systemctl start docker') and add yourself to the docker group" >&2
  exit 1
fi

if ! command -v dockerd >/dev/null; then
  echo "cellbench: installing docker.io (no dockerd on this machine)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

log=/var/log/cellbench-dockerd.log
echo "cellbench: starting dockerd (log: $log)" >&2
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "cellbench: dockerd did not answer within 60 s; see $log" >&2
exit 1
