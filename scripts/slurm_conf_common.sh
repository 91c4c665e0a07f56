# Sourced by setup_slurm.sh and slurm_cluster.sh: the slurm.conf lines both of cellbench's test
# Slurms share (scheduling, process tracking and accounting), written in one place.
slurm_common_lines() {
  cat <<'CONF'
MpiDefault=none
# No cgroups: containers here may not delegate them, and the cells' own limits are docker's.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# No slurmdbd: sacct reads slurmctld, which keeps finished jobs for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MinJobAge=3600
CONF
}
