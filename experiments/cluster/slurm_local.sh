#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying and testing hydra/launcher=slurm.
#
#   experiments/cluster/slurm_local.sh install   # Debian/Ubuntu: slurmctld slurmd slurm-client munge
#   experiments/cluster/slurm_local.sh start     # prints the `export SLURM_CONF=...` to use
#   experiments/cluster/slurm_local.sh status
#   experiments/cluster/slurm_local.sh stop      # cancels its jobs, stops the daemons by PID, keeps the logs
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/diffexp-slurm): slurm.conf (sized from nproc and
# free), a fresh munge key and socket, state, spool, logs and PID files. Nothing under /etc is changed.
# The cluster has no accounting database (like many small clusters): `sacct` does not work on it.
# Needs root: slurmd starts jobs as their user. `start` installs missing packages only when CI=true.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/diffexp-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${SLURM_LOCAL_PARTITION:-debug}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "slurm_local: $*" >&2; exit 1; }
have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
               && command -v munged >/dev/null; }

install() {
  [ "$(id -u)" = 0 ] || die "installing needs root (apt-get); run it as root (sudo)"
  command -v apt-get >/dev/null || die "no apt-get: install SLURM (slurmctld, slurmd, client) and munge yourself"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  have_slurm || die "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are still not on PATH"
}

read_pid() { cat "$1" 2>/dev/null || true; }
pid_alive() { local pid; pid="$(read_pid "$1")"; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

write_conf() {
  local host cpus mem_mb
  host="$(hostname -s)"
  # the node's CPUs, not a thread limit: GNU nproc reports OMP_NUM_THREADS when it is set
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  mem_mb="$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')"
  cat > "$CONF" <<EOF
# written by experiments/cluster/slurm_local.sh: one node ($cpus CPUs, $mem_mb MB), partition $PARTITION
ClusterName=diffexp-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" = 0 ] || die "starting the daemons needs root; run it as root (sudo)"
  if ! have_slurm; then
    if [ "${CI:-}" = "true" ]; then install; else die "SLURM is not installed: run '$0 install' (apt-get, as root)"; fi
  fi
  if pid_alive "$DIR/slurmctld.pid"; then
    echo "slurm_local: already running"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  rm -rf "$DIR/state" "$DIR/spool"  # a fresh cluster each start: no jobs recovered from an earlier one
  mkdir -p "$DIR"/{munge,state,spool,log}
  chmod 700 "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  write_conf
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
         --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  slurmctld -c -f "$CONF"
  slurmd -f "$CONF"
  export SLURM_CONF="$CONF"
  for _ in $(seq 1 60); do   # the node reports idle about a second after slurmd starts
    if sinfo -h -N -o "%t" 2>/dev/null | grep -qx "idle"; then
      echo "slurm_local: up: $(sinfo -h -o '%P %D node(s), %c CPUs, %m MB')"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  die "the node did not become idle within 30 s (logs above, in $DIR/log)"
}

stop() {
  local pidfile pid
  if pid_alive "$DIR/slurmctld.pid" && [ -n "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ]; then
    SLURM_CONF="$CONF" scancel --full $(SLURM_CONF="$CONF" squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 1 50); do   # let slurmd end the jobs' processes before it goes
      [ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    pid="$(read_pid "$pidfile")"
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  echo "slurm_local: stopped (logs kept in $DIR/log)"
}

status() {
  pid_alive "$DIR/slurmctld.pid" || die "not running"
  SLURM_CONF="$CONF" sinfo
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status   (state in \$SLURM_LOCAL_DIR, default /tmp/diffexp-slurm)" >&2; exit 2 ;;
esac
