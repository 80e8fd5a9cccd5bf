#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on localhost (munged + slurmctld + slurmd), for tests.
#
#   tests/slurm_cluster.sh start   # install Debian's slurm-wlm + munge if missing, start, wait for an idle node
#   tests/slurm_cluster.sh stop    # stop what `start` started (by the pids in its pid files)
#   tests/slurm_cluster.sh status
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/pipeline-slurm): config, keys, state, logs.
# After `start`, `source $SLURM_LOCAL_DIR/env.sh` points the SLURM clients at this cluster.
# Needs root (daemons run as root, no systemd) and Debian/Ubuntu for the install step.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/pipeline-slurm}
CONF=$DIR/etc/slurm.conf
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

log() { echo "[slurm_cluster] $*" >&2; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
               && command -v sbatch >/dev/null && command -v munged >/dev/null; }

install_packages() {
  have_slurm && return 0
  [ "$(id -u)" = 0 ] || { log "SLURM is not installed and we are not root"; return 1; }
  command -v apt-get >/dev/null || { log "SLURM is not installed and there is no apt-get"; return 1; }
  log "installing slurmctld slurmd slurm-client munge from the distribution"
  apt-get update -qq >/dev/null
  # Debian's policy-rc.d in containers keeps apt from starting daemons; we start them ourselves.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  have_slurm
}

# Stop one daemon by its pid file, but only if that pid still runs the expected program.
stop_daemon() {
  local name=$1 pidfile=$DIR/run/$1.pid pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    log "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
}

stop() {
  if [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    # Cancel this cluster's jobs first so that no job step outlives slurmd.
    if [ -n "$(squeue -h -o %i 2>/dev/null || true)" ]; then
      scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
      for _ in $(seq 25); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null || true)" ] && break; sleep 0.2; done
    fi
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
}

write_conf() {
  local host=$1 hw mem
  # What slurmd sees (CPUs, sockets, cores, threads), without its RealMemory: declaring more
  # memory than slurmd detects drains the node, so declare 80% of MemTotal.
  hw=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
  mem=$(awk '$1 == "MemTotal:" {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  cat >"$CONF" <<EOF
# written by tests/slurm_cluster.sh
ClusterName=pipeline-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged socket; cred_expire also sets how long a requeued job waits before it may start again.
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MailProg=/bin/true
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
# Keep finished jobs visible to squeue for an hour: there is no slurmdbd, see bin/sacct.
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

write_sacct_shim() {
  # Without slurmdbd the real sacct fails, and submitit (which polls sacct) would never learn
  # that a job died without a result. Answer its query from slurmctld's memory instead.
  cat >"$DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in for a cluster without accounting: `sacct -j IDS -o JobID,State,NodeList --parsable2`
ids=""
while [ $# -gt 0 ]; do
  case $1 in
    -j|--jobs) ids=$2; shift ;;
    --jobs=*) ids=${1#--jobs=} ;;
  esac
  shift
done
echo "JobID|State|NodeList"
exec squeue --states=all --noheader --format='%i|%T|%N' ${ids:+--jobs="$ids"}
EOF
  chmod 755 "$DIR/bin/sacct"
}

start() {
  install_packages || exit 3
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR"/{etc,run,log,state,spool,bin,munge}
  chmod 755 "$DIR/run"          # munged refuses a socket folder others may write to
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  fi
  chmod 400 "$DIR/munge/munge.key"
  local host
  host=$(hostname -s)
  write_conf "$host"
  write_sacct_shim
  printf 'export SLURM_CONF=%q\nexport PATH=%q:$PATH\n' "$CONF" "$DIR/bin" >"$DIR/env.sh"

  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/run/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >/dev/null 2>&1
  # -i: ignore state left by an earlier cluster in the same folder.
  slurmctld -i -f "$CONF" </dev/null >/dev/null 2>&1
  slurmd -f "$CONF" </dev/null >/dev/null 2>&1

  local state=""
  for _ in $(seq 80); do
    state=$(sinfo --noheader --Node --nodes="$host" --format=%t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.25
  done
  if [ "$state" != idle ]; then
    log "node $host is '${state:-unreachable}', not idle; last log lines:"
    tail -n 15 "$DIR"/log/*.log >&2 || true
    stop >/dev/null 2>&1 || true
    exit 4
  fi
  log "one-node SLURM up on $host; source $DIR/env.sh"
}

status() {
  sinfo && squeue --states=all
}

case ${1:-} in
  start|up) start ;;
  stop|down) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
