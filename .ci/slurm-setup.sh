#!/usr/bin/env bash
# A one-host SLURM cluster for tests/test_slurm.py: Debian's slurm-wlm + munge, this host as
# controller and only compute node, every CPU it has, one partition ("ci"). Idempotent: a second
# run finds the daemons up and leaves them. Root only (apt, daemons); anything else is skipped
# with a line, and test_slurm.py then skips (counted) instead of failing.
# Without cgroups (a container): processes tracked by parent pid (proctrack/linuxproc), no task
# binding, no accounting plugins. Requeue needs no slurmdbd.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then echo "slurm-setup: not root, no SLURM (tests/test_slurm.py will skip)"; exit 0; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "slurm-setup: no apt-get (not Debian), no SLURM (tests/test_slurm.py will skip)"; exit 0; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
# the controller, the node and torchrun's rendezvous (MASTER_ADDR) all go by this name
getent hosts "$host" >/dev/null || { echo "slurm-setup: $host does not resolve (/etc/hosts), no SLURM" >&2; exit 1; }
conf=/etc/slurm/slurm.conf
# this node as slurmd sees it (CPUs, sockets, cores, memory), so it never drains for "low memory"
node=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/")
want=$(cat <<CONF
# written by .ci/slurm-setup.sh
ClusterName=salt-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# a requeued job may start again within seconds: it waits for its launch credential to expire
# (default 120 s), then for the scheduler's next pass (default every 60 s)
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2
# time between SIGTERM and SIGKILL: a preempted or requeued run's last step and checkpoint fit in it
KillWait=20
# finished jobs stay visible to scontrol for a while, so a test can read their state
MinJobAge=600
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
if [ ! -f $conf ] || [ "$(cat $conf)" != "$want" ]; then
    echo "$want" > $conf
    restart=1
fi

# munge: the key the package made (or a new one), its daemon as the munge user
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
if ! { munge -n </dev/null | unmunge; } >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "${restart:-0}" = 1 ]; then
    for pid in /run/slurmctld.pid /run/slurmd.pid; do alive $pid && kill "$(cat $pid)"; done
    sleep 1
fi
alive /run/slurmctld.pid || slurmctld
alive /run/slurmd.pid || slurmd

# up: the node idle (or busy) in the partition; one left down or drained by an earlier run is resumed
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
        idle|mixed|allocated|completing) echo "slurm-setup: $host $state ($(sinfo -V))"; exit 0 ;;
        down|drained|draining) scontrol update NodeName="$host" State=RESUME || true ;;
    esac
    sleep 1
done
echo "slurm-setup: the node did not come up (state '${state:-none}'); see /var/log/slurm/*.log" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
