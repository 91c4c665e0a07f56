#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/test_slurm_cluster.py and for
# trying profiles/slurm across nodes. Root on Debian only; safe to run again.
#
# Topology (all under $CELLBENCH_CLUSTER, default /var/lib/cellbench-cluster):
#   slurmctld      on this host, its own config and port (6830): the one-node Slurm of
#                  setup_slurm.sh keeps running beside it.
#   cb-node1/2     one slurmd each (`slurmd -N`, ports 6831/6832), each in its own UTS and mount
#                  namespace: its own hostname, and its own podman store (/var/lib/containers,
#                  /run/containers, /run/libpod bound from nodes/<node>/), so an image one node has
#                  is missing on the other, as on separate machines. The host's docker socket is
#                  hidden from the nodes: a node gets images only by loading an archive.
#   shared storage the machine's own file system: both nodes see the same paths (results/ too).
#   GPUs           cb-node2 has gres gpu:2 on fake device files (nodes/cb-node2/dev/nvidia[0-1],
#                  character devices of NVIDIA's major 195) and an nvidia-smi on its PATH that
#                  lists two fake GPUs: --gres=gpu:1 scheduling and SLURM_STEP_GPUS reach cellbench's
#                  device flags; a container on them cannot start (no driver), as expected.
#   munge          the host's munged and key, shared by every daemon.
#   config         etc/slurm.conf; clients on the host use SLURM_CONF=etc/slurm.conf, and inside
#                  a node it is /etc/slurm/slurm.conf (Snakemake's job step drops SLURM_CONF).
# Both nodes offer the machine's cores, so cells on the two nodes share the same CPUs: a cluster
# for the pipeline's behaviour, never for measuring.
#
# Usage: slurm_cluster.sh up | down | status | exec NODE CMD... | kill-node NODE | start-node NODE
set -euo pipefail

base=${CELLBENCH_CLUSTER:-/var/lib/cellbench-cluster}
conf=$base/etc/slurm.conf
nodes=(cb-node1 cb-node2)
here=$(cd "$(dirname "$0")" && pwd)
. "$here/slurm_conf_common.sh"

node_pid() { cat "/run/cellbench-cluster/slurmd-$1.pid" 2>/dev/null || true; }
node_alive() { local pid; pid=$(node_pid "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

write_config() {
  mkdir -p "$base/etc" "$base/ctld" "$base/log" /run/cellbench-cluster
  local host machine hw mem
  host=$(hostname -s)
  # The machine's CPU layout, its memory halved between the two nodes.
  machine=$(slurmd -C | head -1)
  hw=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=.*//' <<<"$machine")
  mem=$(($(sed -e 's/.*RealMemory=\([0-9]*\).*/\1/' <<<"$machine") / 2))
  local wanted
  wanted=$(cat <<CONF
# Written by cellbench scripts/slurm_cluster.sh: two nodes in namespaces of one host.
ClusterName=cellbench-nodes
SlurmctldHost=$host
SlurmctldPort=6830
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/cellbench-cluster/slurmctld.pid
SlurmdPidFile=/run/cellbench-cluster/slurmd-%n.pid
StateSaveLocation=$base/ctld
SlurmdSpoolDir=$base/nodes/%n/spool
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd-%n.log
$(slurm_common_lines)
GresTypes=gpu
# A node whose slurmd stops answering is DOWN within seconds (the fault tests), and comes back
# by itself when its slurmd registers again; its batch jobs are requeued (JobRequeue=1).
SlurmdTimeout=10
JobRequeue=1
KillWait=5
NodeName=cb-node1 NodeHostname=cb-node1 NodeAddr=127.0.0.1 Port=6831 $hw RealMemory=$mem State=UNKNOWN
NodeName=cb-node2 NodeHostname=cb-node2 NodeAddr=127.0.0.1 Port=6832 $hw RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=main Nodes=cb-node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
)
  local gres="NodeName=cb-node2 Name=gpu File=$base/nodes/cb-node2/dev/nvidia[0-1]"
  if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ] || [ "$(cat "$base/etc/gres.conf" 2>/dev/null)" != "$gres" ]; then
    printf '%s\n' "$wanted" >"$conf"
    printf '%s\n' "$gres" >"$base/etc/gres.conf"
    echo changed
  fi
}

make_nodes() {
  for node in "${nodes[@]}"; do
    mkdir -p "$base/nodes/$node"/{spool,containers,run-containers,run-libpod,bin}
  done
  mkdir -p /var/lib/containers /run/containers /run/libpod "$base/nodes/cb-node2/dev"
  for i in 0 1; do
    [ -c "$base/nodes/cb-node2/dev/nvidia$i" ] || mknod "$base/nodes/cb-node2/dev/nvidia$i" c 195 "$i"
  done
  cat >"$base/nodes/cb-node2/bin/nvidia-smi" <<'SMI'
#!/bin/sh
# cellbench test cluster: two fake GPUs, in the CSV nvidia-smi --query-gpu prints.
case "$*" in
  *--query-gpu=index,uuid,name*) printf '0, GPU-00000000-cbfa-0000-0000-000000000000, Fake GPU (cellbench cluster)\n1, GPU-00000000-cbfa-0000-0000-000000000001, Fake GPU (cellbench cluster)\n' ;;
  *) echo "fake nvidia-smi of the cellbench test cluster: only --query-gpu=index,uuid,name" >&2; exit 9 ;;
esac
SMI
  chmod 755 "$base/nodes/cb-node2/bin/nvidia-smi"
}

start_node() {
  local node=$1 extra=""
  node_alive "$node" && return 0
  # /usr/local/sbin is on root's PATH and empty here: a node's own tools (the fake nvidia-smi).
  [ "$node" = cb-node2 ] && extra="mount --bind $base/nodes/$node/bin /usr/local/sbin;"
  unshare --uts --mount --propagation private -- bash -c "
    set -e
    hostname $node
    mount --bind $base/nodes/$node/containers /var/lib/containers
    mount --bind $base/nodes/$node/run-containers /run/containers
    mount --bind $base/nodes/$node/run-libpod /run/libpod
    mount --bind $base/etc /etc/slurm   # srun inside a job (Snakemake's job step) reads /etc/slurm
    if [ -S /run/docker.sock ]; then mount --bind /dev/null /run/docker.sock; fi
    $extra
    exec slurmd -f $conf -N $node"
}

wait_idle() {
  for _ in $(seq 90); do
    local ok=1
    for node in "${nodes[@]}"; do
      state=$(sinfo --noheader --nodes "$node" --format %t 2>/dev/null || true)
      case "$state" in
        idle | mix | alloc) ;;
        down* | drain*) ok=0; scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        *) ok=0 ;;
      esac
    done
    [ "$ok" = 1 ] && return 0
    sleep 1
  done
  echo "cellbench: cluster nodes not idle after 90 s; see $base/log/" >&2
  sinfo >&2 || true
  return 1
}

stop_all() {
  for node in "${nodes[@]}"; do
    pid=$(node_pid "$node"); [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  pid=$(cat /run/cellbench-cluster/slurmctld.pid 2>/dev/null || true)
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  sleep 1
}

[ "${1:-up}" = up ] || export SLURM_CONF=$conf
case "${1:-up}" in
  up)
    # slurm-wlm, munge and munged (and the one-node Slurm, on its own config)
    env -u SLURM_CONF bash "$here/setup_slurm.sh" >/dev/null
    bash "$here/setup_podman.sh" >/dev/null
    export SLURM_CONF=$conf
    make_nodes
    if [ -n "$(write_config)" ]; then echo "cellbench: wrote $conf" >&2; stop_all; fi
    if ! scontrol ping 2>/dev/null | grep -q UP; then slurmctld -f "$conf"; fi
    for node in "${nodes[@]}"; do start_node "$node"; done
    wait_idle
    echo "cellbench: cluster up: ${nodes[*]} (SLURM_CONF=$conf)" >&2
    ;;
  down) stop_all ;;
  status) sinfo -N --long ;;
  exec) node=$2; shift 2; exec nsenter -t "$(node_pid "$node")" -u -m -- "$@" ;;
  kill-node) pid=$(node_pid "$2"); [ -n "$pid" ] && kill -9 "$pid" ;;
  start-node) start_node "$2" ;;
  *) echo "usage: $0 up | down | status | exec NODE CMD... | kill-node NODE | start-node NODE" >&2; exit 2 ;;
esac
