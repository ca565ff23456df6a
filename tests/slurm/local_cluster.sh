#!/usr/bin/env bash
# A real SLURM cluster on this one machine for the tests (Debian, as root, no systemd):
# slurmctld, one slurmd per emulated node (n1..nN, all on 127.0.0.1), slurmdbd with MariaDB
# (submitit polls sacct; without accounting a killed job's state stays UNKNOWN forever).
#
#   local_cluster.sh start   install what is missing (apt-get), write the configs, start the
#                            daemons that are not running, wait until the nodes are idle
#   local_cluster.sh stop    stop exactly the daemons `start` started (PID files in $RUN, each
#                            checked against its command name), cancel our jobs first
#
# Knobs: HYDRALM_SLURM_NODES (2), HYDRALM_SLURM_CPUS (CPUs advertised per node, 4),
# HYDRALM_SLURM_PREFIX (/var/lib/hydralm-slurm), HYDRALM_SLURM_RUN (/run/hydralm-slurm).
# Loopback only: every daemon address is 127.0.0.1; MariaDB listens on its unix socket only.
set -euo pipefail

NODES=${HYDRALM_SLURM_NODES:-2}
CPUS=${HYDRALM_SLURM_CPUS:-4}
PREFIX=${HYDRALM_SLURM_PREFIX:-/var/lib/hydralm-slurm}
RUN=${HYDRALM_SLURM_RUN:-/run/hydralm-slurm}
MARK="# written by hydralm tests/slurm/local_cluster.sh"
SOCK=/run/mysqld/mysqld.sock
log() { echo "[hydralm-slurm] $*"; }
die() { echo "[hydralm-slurm] ERROR: $*" >&2; exit 1; }

alive() {  # alive <pidfile> <comm>: the PID file names a live process with that command name
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
wait_until() {  # wait_until <seconds> <what> <command...>
  local limit=$1 what=$2 i; shift 2
  for ((i = 0; i < limit * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out after ${limit}s waiting for $what"
}
stop_daemons() {  # stop_daemons <comm>:<pidfile> ...: TERM ours, wait up to 30 s, then KILL
  local spec comm pf pids=() pid i
  for spec in "$@"; do
    comm=${spec%%:*}; pf=${spec#*:}
    if alive "$pf" "$comm"; then pids+=("$(cat "$pf")"); kill -TERM "$(cat "$pf")" 2>/dev/null || true; fi
    rm -f "$pf"
  done
  for ((i = 0; i < 120; i++)); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ $left = 0 ] && return 0; sleep 0.25
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

start() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  local missing=() p
  for p in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    local policy=0 rc=0
    # package scripts must not start daemons: this script starts (and later stops) its own
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy=1; fi
    { DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
    [ $policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || die "apt-get failed ($rc)"
  fi
  mkdir -p "$RUN" "$PREFIX"/{state,spool,log} /etc/slurm
  local host mem nodelines="" n
  host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host $MARK" >>/etc/hosts
  # node names resolve to loopback: the ranks of a 2-node job rendezvous at MASTER_ADDR=n1
  for n in $(node_names); do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n $MARK" >>/etc/hosts
  done
  mem=$(( $(free -m | awk '/^Mem:/{print $2}') / NODES ))
  local port=17001
  for n in $(node_names); do
    nodelines+="NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
    port=$((port + 1))
  done
  [ -s "$PREFIX/dbpass" ] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$PREFIX/dbpass"; chmod 600 "$PREFIX/dbpass"; }
  local old_conf; old_conf=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
  cat >/etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=hydralm
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule within seconds (defaults: 60 s / 30 s), so a requeued job restarts promptly
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
${nodelines}PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$PREFIX/log/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(cat "$PREFIX/dbpass")
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf

  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge "$RUN/munge"
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if ! alive "$RUN/munge/munged.pid" munged && ! (munge -n | unmunge) >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force --pid-file="$RUN/munge/munged.pid"
    wait_until 20 munged bash -c 'munge -n | unmunge'
  fi

  install -d -o mysql -g root -m 0755 /run/mysqld
  install -d -o mysql -g mysql -m 0755 "$RUN/mysql"
  if ! alive "$RUN/mysql/mariadb.pid" mariadbd && ! mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$SOCK" --pid-file="$RUN/mysql/mariadb.pid" \
      --log-error="$PREFIX/log/mariadb.err" </dev/null >/dev/null 2>&1 &
    wait_until 60 mariadbd mariadb-admin --socket="$SOCK" ping
  fi
  mariadb --socket="$SOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(cat "$PREFIX/dbpass")';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$PREFIX/dbpass")';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    slurmdbd || die "slurmdbd did not start; see $PREFIX/log/slurmdbd.log"
    wait_until 60 slurmdbd sacctmgr -n list cluster
  fi
  if alive "$RUN/slurmctld.pid" slurmctld && [ "$old_conf" != "$(cat /etc/slurm/slurm.conf)" ]; then
    scontrol reconfigure || die "scontrol reconfigure failed after a slurm.conf change"
  fi
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    slurmctld || die "slurmctld did not start; see $PREFIX/log/slurmctld.log"
    wait_until 60 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
  fi
  for n in $(node_names); do
    mkdir -p "$PREFIX/spool/slurmd-$n"
    alive "$RUN/slurmd-$n.pid" slurmd || slurmd -N "$n" || die "slurmd -N $n did not start"
  done
  ready() { local s; s=$(sinfo -h -N -o '%t' | sort -u); [ -n "$s" ] && ! grep -qvE '^(idle|mix|alloc)$' <<<"$s"; }
  local i
  for ((i = 0; i < 240; i++)); do
    ready && break
    [ $i = 20 ] && scontrol update nodename="n[1-$NODES]" state=resume 2>/dev/null || true
    sleep 0.25
  done
  ready || { sinfo -N -l; die "nodes not idle after 60 s"; }
  log "up: $NODES nodes x $CPUS CPUs, accounting on"
}

stop() {
  if alive "$RUN/slurmctld.pid" slurmctld; then
    local jobs
    jobs=$(timeout 10 squeue -h -o %A | sort -u | tr '\n' ' ' || true)
    [ -z "${jobs// /}" ] || timeout 10 scancel $jobs || true
  fi
  local specs=("slurmctld:$RUN/slurmctld.pid") pf
  for pf in "$RUN"/slurmd-*.pid; do [ -e "$pf" ] && specs+=("slurmd:$pf"); done
  stop_daemons "${specs[@]}"
  stop_daemons "slurmdbd:$RUN/slurmdbd.pid"
  stop_daemons "mariadbd:$RUN/mysql/mariadb.pid" "munged:$RUN/munge/munged.pid"
  # /etc/hosts may be a bind mount (no rename over it): rewrite it in place without our lines
  local kept; kept=$(grep -vF "$MARK" /etc/hosts || true); printf '%s\n' "$kept" >/etc/hosts
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
