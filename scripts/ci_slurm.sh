#!/usr/bin/env bash
# CI stage "slurm": a one-node Slurm cluster on this machine (Debian's slurm-wlm and munge),
# then tests/integration/test_slurm.py, which submits deploy/slurm/*.sbatch in CPU mode.
#
#   scripts/ci_slurm.sh          # as root (apt-get, and the daemons run as root)
#
# The cluster is private to this run: its config, state and logs live in a temp directory,
# the clients find it through SLURM_CONF, and the daemons this script started are stopped by
# their pids at exit. Nothing under /etc/slurm is written. CPU mode: no gres, one node with
# this machine's CPUs; the tests submit with --gres=none and GMS_BACKEND=cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "== installing Debian's slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
fi

state=$(mktemp -d /tmp/gms-slurm.XXXXXX)
# munged runs as the munge user and must reach its socket directory inside.
chmod 0755 "$state"
pids=()
# shellcheck disable=SC2329  # run by the EXIT trap below
stop_daemons() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$state"
}
trap stop_daemons EXIT
show_logs() {
    tail -n 40 "$state"/*.out "$state"/*.log >&2 2>/dev/null || true
}

echo "== munge (authentication between the Slurm daemons and clients)"
mkdir -p "$state/munge"
chown munge:munge "$state/munge"
# munged wants its socket directory searchable by all (clients connect as any user).
chmod 0755 "$state/munge"
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
munge_socket="$state/munge/munge.socket"
runuser -u munge -- munged --foreground --socket="$munge_socket" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
    --seed-file="$state/munge/munged.seed" >"$state/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
    [ -S "$munge_socket" ] && break
    sleep 0.2
done
if ! munge --socket="$munge_socket" -n | unmunge --socket="$munge_socket" >/dev/null; then
    show_logs
    exit 1
fi

echo "== slurm.conf: one node, $(nproc) CPUs, no gres"
node=$(hostname -s)
memory_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
mkdir -p "$state/ctld" "$state/slurmd"
export SLURM_CONF="$state/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=gms-ci
SlurmctldHost=${node}(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=${munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$((16817 + RANDOM % 1000))
SlurmdPort=$((17818 + RANDOM % 1000))
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
# Containers rarely allow cgroups: track processes by parent pid, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=60
NodeName=${node} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${memory_mb} State=UNKNOWN
PartitionName=ci Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF

echo "== slurmctld and slurmd"
# In the foreground (-D) so that this script owns them; their output goes to the logs below.
slurmctld -D -i -f "$SLURM_CONF" >"$state/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$state/slurmd.out" 2>&1 &
pids+=($!)

node_state=""
for _ in $(seq 60); do
    node_state=$(sinfo --noheader --nodes="$node" --format=%T 2>/dev/null || true)
    [ "$node_state" = idle ] && break
    sleep 1
done
if [ "$node_state" != idle ]; then
    echo "node $node is '${node_state:-unknown}', not idle, after 60 s" >&2
    show_logs
    exit 1
fi
sinfo

echo "== tests (tests/integration/test_slurm.py)"
status=0
GMS_TEST_SLURM=1 python3 -m uv run --locked pytest tests/integration/test_slurm.py || status=$?
if [ "$status" -ne 0 ]; then
    show_logs
fi
exit "$status"
