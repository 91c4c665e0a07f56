#!/usr/bin/env bash
# Set up a machine for cellbench: the Python package (with test and lint tools) and a Docker
# daemon that answers. Safe to run again: it does only what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if ! python3 -c "import cellbench, snakemake, pytest, ruff, snakemake_executor_plugin_slurm, matplotlib" >/dev/null 2>&1; then
  echo "cellbench: installing the cellbench package and its tools (pip install -e '.[dev]')" >&2
  python3 -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
fi
bash "$root/scripts/ensure_docker.sh"
echo "cellbench: ready (docker $(docker version --format '{{.Server.Version}}'), $(snakemake --version | head -1) snakemake)" >&2
