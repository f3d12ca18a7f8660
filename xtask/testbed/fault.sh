#!/bin/bash
# fault.sh - fault hooks for tests, on a running testbed.
#   fault.sh crash HOST              SIGKILL every process in HOST's namespace (slurmd, slurmstepd,
#                                    job tasks, its sshd and ssh sessions)
#   fault.sh netcut HOST [down|up]   take HOST's eth0 down (default) or up; processes keep running
#   fault.sh restart-slurmd NODE     (re)start slurmd on NODE, recording its PID in $TB_RT/pids
#   fault.sh restart-sshd HOST       (re)start sshd on HOST, recording its PID in $TB_RT/pids
#   fault.sh restart-slurmctld login (re)start slurmctld on login (state is kept in $TB_RT/state)
# HOST is login or nodeN. Same environment parameters as up.sh (TB_RT locates the testbed).
set -euo pipefail
ME=fault.sh
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
tb_require_root "$ME"
tb_load_env || { echo "$ME: no testbed is up at TB_RT=$TB_RT" >&2; exit 1; }
tb_defaults
action=$1 h=$2
is_host "$h" || { echo "$ME: unknown host '$h' (hosts: ${HOSTS[*]})" >&2; exit 2; }
[ -e "/run/netns/$P$h" ] || { echo "$ME: namespace $P$h does not exist" >&2; exit 1; }

# kill_wait PID...: SIGKILL and wait until gone (max ~5 s)
kill_wait() {
  local _
  for _ in $(seq 1 100); do
    # shellcheck disable=SC2046
    set -- $(alive "$@")
    [ $# -eq 0 ] && return 0
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.05
  done
  echo "$ME: WARNING: still alive: $*" >&2
}

case $action in
  crash)
    [ $# -eq 2 ] || usage
    n=0
    for _ in $(seq 1 100); do
      # shellcheck disable=SC2046
      set -- $(alive $(ns_pids "$h"))
      [ $# -eq 0 ] && break
      n=$((n + $#))
      kill -KILL "$@" 2>/dev/null || true
      sleep 0.05
    done
    echo "$ME: crashed $h ($n processes killed)"
    ;;
  netcut)
    [ $# -le 3 ] || usage
    dir=${3:-down}
    case $dir in up|down) ;; *) usage ;; esac
    ip -n "$P$h" link set eth0 "$dir"
    echo "$ME: $h eth0 $dir"
    ;;
  restart-slurmd)
    [ $# -eq 2 ] || usage
    [ "$h" != login ] || { echo "$ME: login runs no slurmd" >&2; exit 2; }
    old=$(ns_daemon "$h" /usr/sbin/slurmd)
    # shellcheck disable=SC2086
    [ -z "$old" ] || kill_wait $old
    rm -f "$RT/run/slurmd-$h.pid"
    start_slurmd "$h"
    pid=$(awk -v n="slurmd-$h" '$1==n{p=$2} END{print p}' "$RT/pids")
    waitfor "slurmd pidfile on $h" 10 test -s "$RT/run/slurmd-$h.pid" || exit 1
    echo "$ME: slurmd on $h started (pid $pid)"
    ;;
  restart-sshd)
    [ $# -eq 2 ] || usage
    if [ "$h" != login ] && [ "$TB_NODE_SSHD" != 1 ]; then
      echo "$ME: note: testbed runs without node sshd (TB_NODE_SSHD=0); starting one on $h anyway"
    fi
    old=$(cat "$RT/run/sshd-$h.pid" 2>/dev/null || true)
    if pid_is "$old" /usr/sbin/sshd; then kill_wait "$old"; fi
    start_sshd "$h"
    pid=$(awk -v n="sshd-$h" '$1==n{p=$2} END{print p}' "$RT/pids")
    waitfor "sshd on $h" 10 tcp_open "$(addr "$h")" 22 || exit 1
    echo "$ME: sshd on $h started (pid $pid)"
    ;;
  restart-slurmctld)
    if [ $# -ne 2 ] || [ "$h" != login ]; then usage; fi
    old=$(ns_daemon login /usr/sbin/slurmctld)
    # shellcheck disable=SC2086
    [ -z "$old" ] || kill_wait $old
    start_slurmctld
    pid=$(awk '$1=="slurmctld"{p=$2} END{print p}' "$RT/pids")
    waitfor "slurmctld on login" 20 on login scontrol ping || exit 1
    echo "$ME: slurmctld on login started (pid $pid)"
    ;;
  *) usage ;;
esac
