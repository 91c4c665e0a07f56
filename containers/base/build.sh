#!/usr/bin/env bash
# Build the registry-free base image: Debian bookworm minbase with Python 3.11 (the host's
# Python minor, so a wheelhouse downloaded on the host installs in the image), made by
# debootstrap and `docker import`. The rootfs tarball is cached outside the repository.
set -euo pipefail
tag=${1:?usage: build.sh TAG}
cache=${CELLBENCH_CACHE:-$HOME/.cache/cellbench}
suite=bookworm
mirror=${CELLBENCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-pip,python3-venv,ca-certificates,libnuma1,procps
tarball="$cache/rootfs/$suite-minbase-$(echo "$packages" | sha256sum | cut -c1-12).tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  mkdir -p "$(dirname "$tarball")"
  rootfs=$(mktemp -d "$cache/rootfs/tmp.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$tag"
