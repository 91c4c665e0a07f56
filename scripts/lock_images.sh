#!/usr/bin/env bash
# Regenerate containers/<image>/requirements.lock from the requirements.txt beside it.
# Usage: scripts/lock_images.sh [image ...]   (default: every context with a requirements.txt)
# Needs uv: python3 -m pip install uv==0.13.8
#
# Why uv (`uv pip compile`), not pip-compile: uv resolves for the image's interpreter (CPython
# 3.11 on Debian bookworm: glibc 2.36, x86_64) whatever the host runs, and takes each file's
# sha256 from the index, so a lock costs seconds; pip-compile resolves for the host's Python and
# downloads every file of every pinned version (all platforms, GBs for this closure) to hash it.
# uv reads no pip configuration, so the index, extra indexes, find-links and constraints are read
# from pip's (what the host's `pip download` of the wheelhouse sees), and unsafe-best-match picks
# the best version across all of them, as pip does (uv's default stops at the first index that
# has a name). The lock holds names, versions and hashes only, no machine paths.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}

pip_setting() {  # an environment variable wins over pip's config files, as in pip itself
  local env_name=$1 key=$2
  if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; else python3 -m pip config get "global.$key" 2>/dev/null || true; fi
}
args=(--index-url "$(pip_setting PIP_INDEX_URL index-url)")
[ "${args[1]}" ] || args=(--index-url https://pypi.org/simple)
for url in $(pip_setting PIP_EXTRA_INDEX_URL extra-index-url); do args+=(--extra-index-url "$url"); done
for dir in $(pip_setting PIP_FIND_LINKS find-links); do args+=(--find-links "$dir"); done
for file in $(pip_setting PIP_CONSTRAINT constraint); do args+=(--constraint "$file"); done

if [ $# -eq 0 ]; then
  set -- $(for f in containers/*/requirements.txt; do basename "$(dirname "$f")"; done)
fi
for image in "$@"; do
  dir="containers/$image"
  (cd "$dir" && "$UV" pip compile --quiet --generate-hashes --index-strategy unsafe-best-match \
    --python-version 3.11 --python-platform x86_64-manylinux_2_36 "${args[@]}" \
    --custom-compile-command "scripts/lock_images.sh $image" \
    --output-file requirements.lock requirements.txt)
  # The host's constraint file is no part of the project: keep it out of the "# via" notes.
  sed -i -E '/^    #   -c /d; s/^(    # via) -c .*/\1 pip constraints of the locking host/' "$dir/requirements.lock"
done
