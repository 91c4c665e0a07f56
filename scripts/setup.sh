#!/usr/bin/env bash
# Set up a machine for cellbench: the Python package (with test and lint tools) and a Docker
# daemon that answers. Safe to run again: it does only what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Reinstall when the `cellbench` on this Python is another checkout's (rules call the command).
installed=$(cd / && python3 -c "import cellbench, snakemake, pytest, ruff, snakemake_executor_plugin_slurm, matplotlib
print(cellbench.__file__)" 2>/dev/null || true)
if [ "$installed" != "$root/workflow/cellbench/__init__.py" ]; then
  echo "cellbench: installing the cellbench package and its tools (pip install -e '.[dev]')" >&2
  python3 -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
fi
# Byte-compiled as a regular pip install would be: where PYTHONDONTWRITEBYTECODE is set, an
# editable install compiles every module again in every cell's job (0.1 s a cell). Only stale
# files are compiled again.
python3 -m compileall -q "$root/workflow/cellbench"
bash "$root/scripts/ensure_docker.sh"
echo "cellbench: ready (docker $(docker version --format '{{.Server.Version}}'), $(snakemake --version | head -1) snakemake)" >&2
