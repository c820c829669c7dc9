#!/usr/bin/env bash
# A one-node Slurm cluster with accounting, on this machine: what CI runs tests/test_slurm_real.py against, and a
# way to try `kdbench run --executor slurm` locally (docs/cluster.md).
#
#   .ci/slurm.sh up     install the packages if missing (Debian's, as root), write the configs, start the daemons
#                       and wait until the node is idle
#   .ci/slurm.sh down   stop the daemons by their PIDs (safe when nothing runs)
#   .ci/slurm.sh env    print the line that points Slurm's commands at this cluster: eval "$(.ci/slurm.sh env)"
#
# Everything lives in $KDBENCH_SLURM_DIR (default /tmp/kdbench-slurm): configs, state, the database, logs, PID
# files, munge's key and socket. Nothing is written under /etc, so the machine's own Slurm or munge, if any, is left
# alone. The daemons listen on 127.0.0.1, ports $KDBENCH_SLURM_PORT (default 6817) to +3. There is no systemd in
# CI's container, so the daemons are started by hand in dependency order: munged, mariadbd, slurmdbd, slurmctld,
# slurmd. Jobs inherit slurmd's priority: `nice -n 19 .ci/slurm.sh up` keeps them from slowing other work.
set -euo pipefail

DIR=${KDBENCH_SLURM_DIR:-/tmp/kdbench-slurm}
PORT=${KDBENCH_SLURM_PORT:-6817}
CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; down stops them in reverse
export SLURM_CONF=$DIR/etc/slurm.conf PATH=$PATH:/usr/sbin  # the daemons are in sbin, off a user's PATH

say() { echo "slurm.sh: $*" >&2; }
# A daemon must hold none of the caller's streams: `slurm_env=$(.ci/slurm.sh up)` would wait until it exits.
detached() { "$@" </dev/null >>"$DIR/log/startup.log" 2>&1; }
die() { say "$*"; exit 1; }
pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(pid_of "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# until CMD succeeds, at most SECONDS seconds; on time out, the daemon's log tells why
wait_for() {
  local what=$1 seconds=$2 log=$3; shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "$what did not come up within ${seconds}s; the end of $log and of what the daemons printed:"
      tail -n 20 "$log" "$DIR/log/startup.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}

install_packages() {
  local missing=()
  for tool in slurmctld slurmd sbatch slurmdbd munged mariadbd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]} by hand."
  say "installing ${PACKAGES[*]}"
  apt-get update -q >/dev/null
  # the container's policy-rc.d keeps the services from starting on install: this script starts its own
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_configs() {
  local host node
  host=$(hostname -s)
  # the node as slurmd sees it (CPUs, sockets, memory), addressed on the loopback
  node="$(slurmd -C | head -n 1) NodeAddr=127.0.0.1"
  # one Key=Value per line (several on one line are a parse error), except the node and partition lines
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=kdbench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again once its credential expires: 10 s instead of the default 120
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no cgroups in a container: processes tracked by parentage, tasks not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look for startable jobs every 2 s (defaults 60 and 30): a requeued job becomes eligible after cred_expire with no
# event to wake the scheduler, so it would wait up to half a minute more
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
# a cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30 s), which keeps the tests short
KillWait=5
JobAcctGatherType=jobacct_gather/none
# accounting: sacct, and so submitit, reads job states from slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd, the "password" of auth/munge is the socket of the munge daemon to use
AccountingStoragePass=$DIR/munge/munge.socket
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd refuses a config that others can read: it holds the database password
  (umask 077; cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DIR/etc/db-password")
StorageLoc=slurm_acct_db
EOF
)
}

start_munged() {
  [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
  detached munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force
  wait_for munged 20 "$DIR/log/munged.log" sh -c "munge -n -S '$DIR/munge/munge.socket' | unmunge -S '$DIR/munge/munge.socket'"
}

start_mariadbd() {
  local sql=(mariadb --no-defaults --socket="$DIR/mysql.sock" --user=root)
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || { tail -n 20 "$DIR/log/mariadb-install.log" >&2; exit 1; }
  fi
  setsid mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$DIR/mysql.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" --user=root \
    --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M </dev/null >>"$DIR/log/startup.log" 2>&1 &
  wait_for mariadbd 60 "$DIR/log/mariadbd.log" "${sql[@]}" -e "SELECT 1"
  "${sql[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db-password")';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/db-password")';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurm() {
  detached slurmdbd
  wait_for slurmdbd 60 "$DIR/log/slurmdbd.log" sacctmgr --noheader show cluster
  # the cluster has to be known to accounting before slurmctld reports jobs to it
  if [ -z "$(sacctmgr --noheader --parsable2 show cluster format=cluster)" ]; then
    sacctmgr --immediate add cluster kdbench >/dev/null
  fi
  detached slurmctld
  wait_for slurmctld 60 "$DIR/log/slurmctld.log" scontrol ping
  detached slurmd
  wait_for "the node (idle in sinfo)" 60 "$DIR/log/slurmd.log" sh -c '[ "$(sinfo --noheader --format=%t)" = idle ]'
}

up() {
  bring_up >&2  # stdout carries the export line alone: .ci/run evals it
  echo "export SLURM_CONF=$SLURM_CONF"
}

bring_up() {
  # slurmd starts each job as the user who submitted it, and this cluster's daemons all run as root
  [ "$(id -u)" -eq 0 ] || die "run as root (CI's container is): the daemons run as root here."
  install_packages
  local running=0
  for daemon in "${DAEMONS[@]}"; do alive "$daemon" && running=$((running + 1)); done
  if [ $running -eq ${#DAEMONS[@]} ]; then
    say "already up ($DIR)"
  else
    [ $running -eq 0 ] || die "some of the daemons run and some do not: run $0 down first."
    mkdir -p "$DIR"/{etc,run,log,munge,state/slurmctld,state/slurmd}
    chmod 700 "$DIR" "$DIR/munge"
    [ -f "$DIR/etc/db-password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '+/=' >"$DIR/etc/db-password")
    write_configs
    start_munged
    start_mariadbd
    start_slurm
    say "up: one node, $(sinfo --noheader --format='%c CPUs, %m MB') ($DIR)"
  fi
}

stop() {
  local daemon=$1 pid
  pid=$(pid_of "$daemon")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { say "$daemon ($pid) ignored SIGTERM for 30 s: SIGKILL"; kill -9 "$pid"; }
  fi
  rm -f "$DIR/run/$daemon.pid"
}

down() {
  # jobs still queued or running would outlive slurmd (their slurmstepd keeps them): cancel them while it listens
  if alive slurmctld && [ -n "$(squeue --noheader --format=%i 2>/dev/null)" ]; then
    squeue --noheader --format=%i | xargs --no-run-if-empty scancel 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue --noheader --format=%i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop "${DAEMONS[i]}"; done
  say "down ($DIR)"
}

case ${1-} in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|env   (state in \$KDBENCH_SLURM_DIR, default /tmp/kdbench-slurm)" >&2; exit 2 ;;
esac
