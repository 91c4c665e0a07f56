#!/usr/bin/env bash
# podman as the container runtime of cells (CELLBENCH_RUNTIME=podman): Debian's podman, the
# init binary behind `--init` (catatonit), and machine-wide defaults podman needs on hosts
# like this one. Safe to run again. Root on Debian only.
set -euo pipefail

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "cellbench: setup_podman.sh sets podman up on a root Debian machine only" >&2
  exit 1
fi
if ! command -v podman >/dev/null || [ ! -x /usr/libexec/podman/catatonit ]; then
  echo "cellbench: installing podman and catatonit" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 podman catatonit >/dev/null
fi

# podman (unlike docker) sets nofile and nproc in every container, by default above what an
# unprivileged host (a VM sandbox, a CI runner) lets a process raise them to, and then no
# container starts ("error setting rlimit ... operation not permitted"). Ask for what this host
# has; nproc above kernel.pid_max is refused too. runc: crun refuses hybrid cgroup hierarchies.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
if [ "$nofile" = unlimited ]; then nofile=1048576; fi
conf=/etc/containers/containers.conf
wanted=$(cat <<CONF
# Written by cellbench scripts/setup_podman.sh for this host's limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
CONF
)
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
  mkdir -p /etc/containers
  printf '%s\n' "$wanted" >"$conf"
  echo "cellbench: wrote $conf (nofile $nofile, nproc $nproc, runc)" >&2
fi
