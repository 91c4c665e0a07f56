#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the Slurm end-to-end test and for trying
# profiles/slurm: Debian's slurm-wlm + munge, a slurm.conf for this host (its real CPUs and
# memory from `slurmd -C`), munged, slurmctld and slurmd. No slurmdbd: accounting storage is
# off, so sacct asks slurmctld, which keeps finished jobs for MinJobAge seconds.
# Safe to run again: it does only what is missing. Root on Debian only.
set -euo pipefail
. "$(dirname "$0")/slurm_conf_common.sh"

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "cellbench: setup_slurm.sh sets up a local Slurm on a root Debian machine only" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "cellbench: installing slurm-wlm and munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
node_line=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
wanted=$(cat <<CONF
# Written by cellbench scripts/setup_slurm.sh: one node, this host.
ClusterName=cellbench
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$(slurm_common_lines)
$node_line State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
  echo "cellbench: writing $conf ($node_line)" >&2
  printf '%s\n' "$wanted" >"$conf"
  changed=1
else
  changed=0
fi

if [ ! -s /etc/munge/munge.key ]; then
  echo "cellbench: creating the munge key" >&2
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "cellbench: starting munged" >&2
  runuser -u munge -- /usr/sbin/munged
fi

if [ "$changed" = 1 ]; then  # a new config needs fresh daemons
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  sleep 1
fi
if ! scontrol ping 2>/dev/null | grep -q UP; then
  echo "cellbench: starting slurmctld" >&2
  slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
  echo "cellbench: starting slurmd" >&2
  slurmd
fi

for _ in $(seq 60); do
  state=$(sinfo --noheader --nodes "$host" --format %t 2>/dev/null || true)
  case "$state" in
    idle | mix | alloc) exit 0 ;;
    down* | drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "cellbench: Slurm node $host is not idle after 60 s (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
