#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `launcher=slurm` (time limits, preemption,
# requeue) without a cluster; the `slurm` tests run against it.
#
#   sudo scripts/slurm_cluster.sh start    # installs the Debian packages if missing; idempotent
#   scripts/slurm_cluster.sh status        # exit 0 when jobs can be submitted
#   sudo scripts/slurm_cluster.sh stop
#
# Daemons: munged (authentication), MariaDB + slurmdbd (accounting: submitit reads job states
# with sacct), slurmctld and slurmd (one node with every CPU of this machine, one partition
# "debug"). Configuration and state live under /etc/slurm and /var/lib/multimax-slurm.
set -euo pipefail

CLUSTER=multimax
STATE=/var/lib/multimax-slurm
CONF=/etc/slurm
DB_PASSWORD=multimax-local

log() { echo "[slurm_cluster] $*" >&2; }

ready() {
  command -v sinfo >/dev/null 2>&1 &&
    timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' &&
    timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1
}

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "starting a cluster needs root (daemons, /etc/slurm, packages); run it with sudo"
    exit 2
  fi
}

install_packages() {
  local missing=()
  for tool in slurmctld:slurmctld slurmd:slurmd slurmdbd:slurmdbd sbatch:slurm-client \
    munged:munge mysqld_safe:mariadb-server; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]} from the distribution's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
}

start_munge() {
  pgrep -x munged >/dev/null && return
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged
}

start_mariadb() {
  if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (mysqld_safe --user=mysql >/dev/null 2>&1 &)
    for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

write_config() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  mkdir -p "$CONF" "$STATE/ctld" "$STATE/d" /var/log/slurm
  cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
  chmod 600 "$CONF/slurmdbd.conf"
  # cred_expire: a requeued job waits this long (120 s by default) before it may start again.
  cat >"$CONF/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
JobRequeue=1
KillWait=30
MinJobAge=300
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if ready; then
    log "running (sinfo: $(sinfo -h -o '%P %D %T' | head -n 1))"
    return
  fi
  need_root
  install_packages
  start_munge
  start_mariadb
  write_config
  pgrep -x slurmdbd >/dev/null || slurmdbd
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do ready && break; sleep 0.5; done
  scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
  if ! ready; then
    log "the cluster did not come up; see /var/log/slurm/*.log"
    exit 1
  fi
  log "running (sinfo: $(sinfo -h -o '%P %D %T' | head -n 1))"
}

stop() {
  need_root
  local pidfile
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" \
    /run/munge/munged.pid; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  mysqladmin -u root shutdown >/dev/null 2>&1 || true
  for _ in $(seq 40); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x slurmdbd >/dev/null ||
      break
    sleep 0.5
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if ready; then log "running"; else log "not running"; exit 1; fi
    ;;
  -h | --help)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "usage: $0 start|stop|status (--help: what it starts)" >&2
    exit 2
    ;;
esac
