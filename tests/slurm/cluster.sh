#!/usr/bin/env bash
# A real one-node SLURM cluster for the tests: Debian's Slurm 22.05 + munge, started without systemd.
#
#   tests/slurm/cluster.sh up      install the packages if missing, write the config, start munged,
#                                  slurmctld and slurmd, wait until the node is idle, smoke-test a GPU job
#   tests/slurm/cluster.sh down    cancel the remaining jobs and stop the daemons this script started, by PID
#   tests/slurm/cluster.sh status  exit 0 when this script's slurmctld and slurmd are running
#
# The node advertises 2 fake GPUs of type "testgpu" (character devices with the NVIDIA major number; nothing
# opens them) and two partitions, "debug" (default) and "gpu". Without slurmdbd there is no accounting, so
# Snakemake must poll with `--slurm-status-command squeue`; MinJobAge=3600 keeps finished jobs visible to squeue.
# Recipe and pitfalls: /work/shared/research/slurm_local.md.
#
# Environment: LIPFLOW_SLURM_BASE (state, logs, PID files, fake devices; default /tmp/lipflow-slurm),
# LIPFLOW_SLURM_CPUS (CPUs the node advertises; default max(nproc, 8), so the light test jobs of a sweep run at once),
# LIPFLOW_SLURM_GPUS (default 2).
set -euo pipefail

BASE=${LIPFLOW_SLURM_BASE:-/tmp/lipflow-slurm}
RUN=$BASE/run
HOST=$(hostname -s)
# slurm.conf must live in /etc/slurm: the jobstep plugin strips SLURM_CONF from the job environment.
CONF_DIR=/etc/slurm
MARKER="# written by lipflow tests/slurm/cluster.sh"
NPROC=$(nproc)
CPUS=${LIPFLOW_SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
GPUS=${LIPFLOW_SLURM_GPUS:-2}
GPU_TYPE=testgpu
# Memory is only bookkept (no cgroup enforcement): advertise at least 16 GB so profile defaults always fit.
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
MEM_MB=$(( MEM_MB > 16000 ? MEM_MB : 16000 ))
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "cluster.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
show_logs() { for f in "$RUN"/log/*; do [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done >&2 || true; }

install_packages() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch srun squeue sinfo scontrol munged munge; do
        command -v "$tool" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is missing: install ${PACKAGES[*]}"
    local t0; t0=$(now)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    echo "installed ${PACKAGES[*]} in $(elapsed "$t0") s"
}

write_config() {
    mkdir -p "$CONF_DIR"
    local f
    for f in slurm.conf gres.conf cgroup.conf; do
        if [ -e "$CONF_DIR/$f" ] && ! grep -qxF "$MARKER" "$CONF_DIR/$f"; then
            die "$CONF_DIR/$f exists and was not written by this script; refusing to overwrite a real SLURM setup"
        fi
    done
    mkdir -p "$BASE/dev"
    local i devices=()
    for (( i = 0; i < GPUS; i++ )); do
        [ -c "$BASE/dev/nvidia$i" ] || { rm -f "$BASE/dev/nvidia$i"; mknod "$BASE/dev/nvidia$i" c 195 "$i"; }
        devices+=("$BASE/dev/nvidia$i")
    done
    local gpu_files; gpu_files=$(IFS=,; echo "${devices[*]}")
    cat > "$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=lipflowtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$RUN/slurmctld
SlurmdSpoolDir=$RUN/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
Waittime=0
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$GPU_TYPE:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/gres.conf" <<EOF
$MARKER
AutoDetect=off
NodeName=$HOST Name=gpu Type=$GPU_TYPE File=$gpu_files
EOF
    cat > "$CONF_DIR/cgroup.conf" <<EOF
$MARKER
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

start_munge() {
    alive "$RUN/munged.pid" && return
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "using the munged that is already running (not stopped by 'down')"
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    rm -f /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        </dev/null >"$RUN/log/munged.start.log" 2>&1 || { show_logs; die "munged failed to start"; }
    cp /run/munge/munged.pid "$RUN/munged.pid"
    munge -n | unmunge >/dev/null || die "munge round trip failed"
}

# start_daemon NAME COMMAND...: start a self-daemonising SLURM daemon unless its PID file names a live process.
start_daemon() {
    local name=$1; shift
    alive "$RUN/$name.pid" && return
    rm -f "$RUN/$name.pid"
    "$@" </dev/null >"$RUN/log/$name.start.log" 2>&1 || { show_logs; die "$name failed to start"; }
    local i
    for (( i = 0; i < 100; i++ )); do alive "$RUN/$name.pid" && return; sleep 0.1; done
    show_logs; die "$name did not write $RUN/$name.pid"
}

wait_idle() {
    local i state resumed=0
    for (( i = 0; i < 60; i++ )); do
        alive "$RUN/slurmd.pid" || { show_logs; die "slurmd died (see the logs above)"; }
        state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1)
        case $state in
            idle|mix|mix-|alloc) return ;;
            down*|drain*|inval*|fail*)
                [ "$resumed" = 0 ] && scontrol update NodeName="$HOST" State=RESUME && resumed=1 ;;
        esac
        sleep 0.5
    done
    show_logs; die "node $HOST is not idle after 30 s (state '$state')"
}

smoke_test() {
    local visible
    visible=$(timeout 60 srun -N1 -n1 --gpus=1 printenv CUDA_VISIBLE_DEVICES) \
        || { show_logs; die "srun smoke test failed"; }
    [[ $visible =~ ^[0-9]+$ ]] || die "srun --gpus=1 saw CUDA_VISIBLE_DEVICES='$visible', expected a GPU index"
}

up() {
    [ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmctld and slurmd; writes $CONF_DIR)"
    local t0; t0=$(now)
    install_packages
    local t1; t1=$(now)
    if ! alive "$RUN/slurmctld.pid" && ! alive "$RUN/slurmd.pid"; then
        rm -rf "$RUN/slurmctld" "$RUN/slurmd" "$RUN/log"   # a fresh cluster: job ids start at 1
    fi
    mkdir -p "$RUN/slurmctld" "$RUN/slurmd" "$RUN/log"
    write_config
    start_munge
    start_daemon slurmctld /usr/sbin/slurmctld -f "$CONF_DIR/slurm.conf"
    start_daemon slurmd /usr/sbin/slurmd -f "$CONF_DIR/slurm.conf"
    wait_idle
    smoke_test
    echo "cluster up: node $HOST, $CPUS CPUs, $GPUS x gpu:$GPU_TYPE, partitions debug (default) and gpu;" \
         "bring-up $(elapsed "$t1") s (total $(elapsed "$t0") s)"
}

# stop_pids PIDFILE...: TERM every live PID at once, wait up to 10 s, KILL what is left, remove the files.
stop_pids() {
    local f pids=() i pid left
    for f in "$@"; do alive "$f" && pids+=("$(cat "$f")"); done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for (( i = 0; i < 100; i++ )); do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        [ "${#left[@]}" = 0 ] && break
        sleep 0.1
    done
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$@"
}

down() {
    local t0 i; t0=$(now)
    if alive "$RUN/slurmctld.pid"; then
        scancel --quiet --user=root 2>/dev/null || true
        for (( i = 0; i < 50; i++ )); do
            [ -z "$(squeue -h -t PENDING,RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pids "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/munged.pid"
    local f
    for f in slurm.conf gres.conf cgroup.conf; do
        [ -e "$CONF_DIR/$f" ] && grep -qxF "$MARKER" "$CONF_DIR/$f" && rm -f "$CONF_DIR/$f"
    done
    echo "cluster down in $(elapsed "$t0") s"
}

status() { alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid"; }

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
