#!/usr/bin/env bash
# start_slurm.sh -- bring up a REAL single-node Slurm cluster on localhost (Debian 12 / slurm 22.05)
# for batchgen's cluster tests and for trying `make slurm` on one machine.
#   munged -> [mariadbd -> slurmdbd] -> slurmctld -> slurmd, all as root, no systemd, no cgroups.
# Idempotent: installs missing packages, (re)writes configs, starts only daemons that are not
# already running (checked via our pid files + /proc/PID/comm). Stop with stop_slurm.sh.
#
# Exit status: 0 ready; 3 this machine cannot host the cluster (not root, a port taken by another
# program, packages not installable), so a test skips with the printed reason (under CI=true it
# fails with it); other: a failure -- among them another apt/dpkg run holding its lock past
# APT_LOCK_WAIT (waiting for that lock is no reason to call the machine unfit).
#
# Env knobs:
#   LOCAL_SLURM_DIR   base dir for state/spool/logs/pids   (default /tmp/local-slurm)
#   WITH_ACCOUNTING   1 = slurmdbd+mariadb so `sacct` works (submitit needs it to notice
#                     cancelled/killed jobs); 0 = accounting_storage/none   (default 1)
#   SLURM_PARTITION   partition name                         (default debug)
#   SLURM_NCPUS       CPUs advertised for the node           (default: nproc; >nproc => oversubscribe)
#   SLURM_DB_PORT     TCP port of the private mariadbd       (default 33061)
#   SMOKE_TEST        1 = run `srun hostname` at the end     (default 1)
#   APT_LOCK_WAIT     seconds to wait, in all, for another apt/dpkg run to release its lock
#                     before installing the packages         (default 600)
set -euo pipefail

BASE=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
WITH_ACCOUNTING=${WITH_ACCOUNTING:-1}
PARTITION=${SLURM_PARTITION:-debug}
DBPORT=${SLURM_DB_PORT:-33061}
SMOKE_TEST=${SMOKE_TEST:-1}
APT_LOCK_WAIT=${APT_LOCK_WAIT:-600}
CLUSTER=localcluster
NODE=$(hostname -s)
RUN=$BASE/run; LOG=$BASE/log; STATE=$BASE/state; SPOOL=$BASE/spool; DB=$BASE/mysql
T_START=$(date +%s.%N)

log() { echo "[start_slurm $(date +%T)] $*"; }
elapsed() { awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}'; }
# alive PIDFILE COMM : pid file exists and names a live process with that comm
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}
# wait_for TIMEOUT_S DESCRIPTION CMD... : poll CMD until success
wait_for() {
  local t=$1 d=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then log "TIMEOUT waiting for $d (see $LOG)"; return 1; fi
    sleep 0.2
  done
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# cannot REASON : this machine cannot host the cluster (exit 3, see the header)
cannot() { echo "start_slurm: cannot start Slurm here: $*" >&2; exit 3; }
# apt_get ARGS... : apt-get (output -> $LOG/apt.log) that waits, until $APT_DEADLINE, for another
# apt/dpkg run instead of failing at once: for dpkg's frontend lock through DPkg::Lock::Timeout
# (apt >= 1.9), for the locks it does not cover (update's /var/lib/apt/lists/lock) by retrying
# every 10 s. Returns 0 done, 2 a lock still held at the deadline, 1 another failure.
APT_LOCKED='Could not get lock|Unable to (acquire|lock)'
apt_get() {
  local out rc left
  while :; do
    left=$(( APT_DEADLINE - $(date +%s) )); [ "$left" -gt 0 ] || left=1
    rc=0; out=$(LC_ALL=C apt-get -o DPkg::Lock::Timeout="$left" "$@" 2>&1) || rc=$?
    printf '%s\n' "$out" >> "$LOG/apt.log"
    [ "$rc" = 0 ] && return 0
    grep -Eq "$APT_LOCKED" <<<"$out" || return 1
    [ "$(date +%s)" -lt "$APT_DEADLINE" ] || return 2
    log "waiting for another apt/dpkg run: $(grep -E -m1 "$APT_LOCKED" <<<"$out")"
    sleep 10
  done
}
# apt_failed RC WHAT : after apt_get failed: a lock still held is a failure (exit 1), else `cannot`
apt_failed() {
  tail -20 "$LOG/apt.log"
  if [ "$1" = 2 ]; then
    echo "start_slurm: $2: another apt/dpkg run still held its lock after ${APT_LOCK_WAIT}s" >&2
    exit 1
  fi
  cannot "$2 failed"
}
# port_free_or_ours PORT PIDFILE COMM : refuse a port held by a program that is not our daemon
port_free_or_ours() {
  if tcp_open "$1" && ! alive "$RUN/$2.pid" "$3"; then
    cannot "port $1 (for $2) is in use by another program"
  fi
}

[ "$(id -u)" = 0 ] || cannot "must run as root (uid $(id -u))"
mkdir -p "$RUN" "$LOG" "$STATE" "$SPOOL"
for spec in 6817:slurmctld 6818:slurmd; do port_free_or_ours "${spec%%:*}" "${spec#*:}" "${spec#*:}"; done
if [ "$WITH_ACCOUNTING" = 1 ]; then
  port_free_or_ours 6819 slurmdbd slurmdbd
  port_free_or_ours "$DBPORT" mariadbd mariadbd
fi

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$WITH_ACCOUNTING" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server-core mariadb-client-core"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  command -v apt-get >/dev/null || cannot "packages missing ($missing) and no apt-get"
  : > "$LOG/apt.log"
  APT_DEADLINE=$(( $(date +%s) + APT_LOCK_WAIT ))
  apt_get update -qq || apt_failed $? "apt-get update"
  # shellcheck disable=SC2086
  apt_get install -y -qq --no-install-recommends $missing || apt_failed $? "apt-get install$missing"
  log "packages installed ($(elapsed))"
fi

# ---------------------------------------------------------------- 2. munge
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if alive "$RUN/munged.pid" munged; then
  log "munged already running (ours, pid $(cat "$RUN/munged.pid"))"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "a foreign munged is already serving /run/munge -- using it (will not stop it)"
else
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 munged sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$RUN/munged.pid"
  log "munged started (pid $(cat "$RUN/munged.pid"))"
fi

# ---------------------------------------------------------------- 3. mariadb + slurmdbd (optional)
if [ "$WITH_ACCOUNTING" = 1 ]; then
  # mariadb-server-core (unlike mariadb-server) does not create the mysql user on a fresh machine.
  if ! id -u mysql >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mysql
    log "created system user mysql"
  fi
  mkdir -p "$DB"; chown mysql:mysql "$DB"
  if [ ! -d "$DB/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
      --auth-root-authentication-method=socket --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
      || { tail -20 "$LOG/mariadb-install.log"; exit 1; }
  fi
  if alive "$RUN/mariadbd.pid" mariadbd; then
    log "mariadbd already running (pid $(cat "$RUN/mariadbd.pid"))"
  else
    rm -f "$DB/mariadbd.pid"
    setsid nohup /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" \
      --socket="$DB/mysqld.sock" --pid-file="$DB/mariadbd.pid" --bind-address=127.0.0.1 \
      --port="$DBPORT" --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=128M \
      --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb --no-defaults --socket="$DB/mysqld.sock" -uroot -e 'SELECT 1'
    wait_for 10 mariadbd-pidfile test -s "$DB/mariadbd.pid"
    cp "$DB/mariadbd.pid" "$RUN/mariadbd.pid"
    log "mariadbd started (pid $(cat "$RUN/mariadbd.pid"), port $DBPORT)"
  fi
  mariadb --no-defaults --socket="$DB/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmdbpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
DebugLevel=info
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  if alive "$RUN/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running (pid $(cat "$RUN/slurmdbd.pid"))"
  else
    slurmdbd
    wait_for 60 slurmdbd tcp_open 6819
    wait_for 15 slurmdbd-pidfile alive "$RUN/slurmdbd.pid" slurmdbd
    log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
  fi
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

# ---------------------------------------------------------------- 4. slurm.conf
HWCPUS=$(nproc)
NCPUS=${SLURM_NCPUS:-$HWCPUS}
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); MEM=$(( MEM * 9 / 10 ))
if [ "$NCPUS" -le "$HWCPUS" ]; then
  NODELINE="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$MEM State=UNKNOWN"
  EXTRA=""
else   # pretend to have more CPUs than the hardware (handy for parallel array tasks in CI)
  NODELINE="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN"
  EXTRA="SlurmdParameters=config_overrides"
fi
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
$EXTRA
$NODELINE
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if alive "$RUN/slurmctld.pid" slurmctld; then
  log "slurmctld already running (pid $(cat "$RUN/slurmctld.pid")) -> scontrol reconfigure"
  scontrol reconfigure || true
else
  slurmctld            # daemonizes; recovers state from $STATE if present
  wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'
  wait_for 15 slurmctld-pidfile alive "$RUN/slurmctld.pid" slurmctld
  log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
fi
if alive "$RUN/slurmd.pid" slurmd; then
  log "slurmd already running (pid $(cat "$RUN/slurmd.pid"))"
else
  slurmd -N "$NODE"
  wait_for 15 slurmd-pidfile alive "$RUN/slurmd.pid" slurmd
  log "slurmd started (pid $(cat "$RUN/slurmd.pid"))"
fi
node_ok() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
if ! wait_for 20 "node $NODE to be ready" node_ok; then
  scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  wait_for 20 "node $NODE to be ready" node_ok || { sinfo -N -l; exit 1; }
fi
sinfo
if [ "$SMOKE_TEST" = 1 ]; then
  log "smoke test: srun hostname -> $(timeout 60 srun -p "$PARTITION" -N1 -n1 hostname)"
fi
log "cluster '$CLUSTER' ready, partition '$PARTITION' ($(elapsed) total)"
