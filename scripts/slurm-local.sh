#!/bin/sh
# A throw-away single-node Slurm cluster on loopback, for tests and benches.
#
#   scripts/slurm-local.sh up [--owner PID]   install if missing, start; prints SLURM_CONF=PATH
#   scripts/slurm-local.sh down DIR           stop the cluster whose state is in DIR, remove DIR
#
# Needs root and Debian's packages (slurmctld, slurmd, slurm-client, munge),
# which `up` installs with apt-get when they are missing. Nothing is started
# through systemd and nothing under /etc is used: munged, slurmctld and slurmd
# run from a fresh temporary DIR holding the config, the munge key, spool,
# state, logs and the pids they are stopped by (never by name). Point Slurm's
# commands at the cluster with the printed SLURM_CONF. With --owner, the
# cluster goes down by itself once process PID has exited.
#
# Exit status: 0 up (or down), 3 when Slurm cannot be set up here (not root,
# no apt-get), with the reason on stderr; anything else is a failure.
#
# The node declares 8 CPUs whatever the machine has (config_overrides), so
# tiny jobs run side by side on a small machine; cgroups are avoided
# (proctrack/linuxproc, task/none) and there is no accounting (no sacct).
# EnforcePartLimits=ALL makes sbatch refuse a request no partition can meet.
set -eu

PACKAGES="slurmctld slurmd slurm-client munge"
NODE=llmflow-node
CPUS=8
MEM_MB=8000

cannot() {
    echo "slurm-local: cannot set up Slurm: $*" >&2
    exit 3
}

install() {
    missing=
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || cannot "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || cannot "Slurm is not installed and there is no apt-get to install it"
    echo "slurm-local: installing $PACKAGES" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >&2
}

# Waits up to 20 s for a command to succeed.
wait_for() {
    what=$1
    shift
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le 200 ] || { echo "slurm-local: $what did not come up; logs in $DIR" >&2; down; exit 1; }
        sleep 0.1
    done
}

up() {
    owner=
    [ "${1:-}" = --owner ] && owner=$2
    [ "$(id -u)" = 0 ] || cannot "the daemons run as root here and this is uid $(id -u)"
    install
    PATH="$PATH:/usr/sbin"
    DIR=$(mktemp -d /tmp/llmflow-slurm.XXXXXX)
    chmod 755 "$DIR"
    mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/munge"
    chmod 700 "$DIR/munge"
    # Ports of our own, so a cluster already on the machine is left alone.
    port=$((20000 + $(od -An -N2 -tu2 /dev/urandom) % 20000))
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=llmflow
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pidfile
SlurmdPidFile=$DIR/slurmd.pidfile
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    dd if=/dev/urandom of="$DIR/munge/key" bs=1024 count=1 2>/dev/null
    chmod 400 "$DIR/munge/key"
    munged --foreground --force --key-file="$DIR/munge/key" --socket="$DIR/munge/socket" \
        --pid-file="$DIR/munge/pid" --seed-file="$DIR/munge/seed" --log-file="$DIR/munged.log" \
        </dev/null >>"$DIR/munged.log" 2>&1 &
    echo $! >"$DIR/munged.pid"
    wait_for munged test -S "$DIR/munge/socket"
    export SLURM_CONF="$DIR/slurm.conf"
    slurmctld -D -f "$SLURM_CONF" </dev/null >>"$DIR/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid"
    slurmd -D -f "$SLURM_CONF" -N "$NODE" </dev/null >>"$DIR/slurmd.out" 2>&1 &
    echo $! >"$DIR/slurmd.pid"
    wait_for "the node" sh -c "sinfo -h -N -o %T | grep -qx idle"
    if [ -n "$owner" ]; then
        # setsid: the watcher outlives the shell (and the process group) that started it.
        setsid sh -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$0' down '$DIR'" </dev/null >/dev/null 2>&1 &
        echo $! >"$DIR/watcher.pid"
    fi
    echo "SLURM_CONF=$SLURM_CONF"
}

# Stops each daemon by its recorded pid, if that pid is still the daemon we started.
down() {
    for name in slurmd slurmctld munged; do
        pidfile="$DIR/$name.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$DIR"; then
            kill "$pid" 2>/dev/null || true
            i=0
            while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
                sleep 0.1
                i=$((i + 1))
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    case "$DIR" in /tmp/llmflow-slurm.*) rm -rf "$DIR" ;; esac
}

case "${1:-}" in
up)
    shift
    up "$@"
    ;;
down)
    [ $# -eq 2 ] || { echo "usage: $0 down DIR" >&2; exit 2; }
    DIR=$2
    down
    ;;
*)
    echo "usage: $0 up [--owner PID] | down DIR" >&2
    exit 2
    ;;
esac
