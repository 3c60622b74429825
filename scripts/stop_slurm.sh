#!/usr/bin/env bash
# stop_slurm.sh -- stop ONLY the daemons started by scripts/start_slurm.sh, identified by the pid files
# it wrote in $LOCAL_SLURM_DIR/run and verified against /proc/PID/comm (no pkill/killall).
# Jobs still queued/running in this private cluster are scancel'ed first.
# PURGE_STATE=1 additionally deletes Slurm state/spool/logs and the private mariadb data dir.
set -uo pipefail
BASE=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
RUN=$BASE/run
log() { echo "[stop_slurm $(date +%T)] $*"; }
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# cancel remaining jobs while the controller is still up
if alive "$RUN/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

stop_one() {  # NAME(comm)
  local name=$1 pf=$RUN/$1.pid pid
  if ! alive "$pf" "$name"; then
    [ -e "$pf" ] && { log "$name: stale pid file removed"; rm -f "$pf"; } || log "$name: not running (by us)"
    return 0
  fi
  pid=$(cat "$pf")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do alive "$pf" "$name" || break; sleep 0.2; done
  if alive "$pf" "$name"; then log "$name ($pid) ignored SIGTERM -> SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
  rm -f "$pf"
  log "$name ($pid) stopped"
}

# reverse start order
for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_one "$d"; done

if [ "${PURGE_STATE:-0}" = 1 ]; then
  rm -rf "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/mysql" "$RUN"
  log "state purged"
fi
