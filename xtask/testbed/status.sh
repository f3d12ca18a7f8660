#!/bin/bash
# status.sh - show the testbed's hosts and SLURM's view of them. Exits 1 when the testbed is not up.
set -uo pipefail
ME=status.sh
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tb_require_root "$ME"
if ! tb_load_env || [ ! -f "$TB_RT/testbed.env" ]; then
  tb_defaults
  if [ -e "$TB_RT" ] || [ -n "$(our_netns)" ]; then
    echo "$ME: testbed at $TB_RT is only partly up (up.sh failed or is running); run down.sh, then up.sh" >&2
  else
    echo "$ME: no testbed is up at TB_RT=$TB_RT (start one with $TB_DIR/up.sh)" >&2
  fi
  exit 1
fi
tb_defaults

daemon_state() {  # daemon_state HOST EXE -> "pid N" or "-"
  local p; p=$(ns_daemon "$1" "$2" | head -1)
  if [ -n "$p" ]; then echo "$p"; else echo "-"; fi
}
link_state() { ip -n "$P$1" -o link show eth0 2>/dev/null | grep -q 'state UP\|,UP' && echo up || echo DOWN; }

bad=0
printf '%-8s %-14s %-6s %-5s %-10s %-10s %-10s\n' HOST ADDRESS NETNS ETH0 SLURMCTLD SLURMD SSHD
for h in "${HOSTS[@]}"; do
  if [ -e "/run/netns/$P$h" ]; then ns=yes; eth=$(link_state "$h"); else ns=NO; eth=-; bad=1; fi
  ctld=-; sd=-; ssh=-
  if [ "$ns" = yes ]; then
    [ "$h" = login ] && ctld=$(daemon_state "$h" /usr/sbin/slurmctld)
    [ "$h" != login ] && sd=$(daemon_state "$h" /usr/sbin/slurmd)
    ssh=$(daemon_state "$h" /usr/sbin/sshd)
  fi
  printf '%-8s %-14s %-6s %-5s %-10s %-10s %-10s\n' "$h" "$(addr "$h")" "$ns" "$eth" "$ctld" "$sd" "$ssh"
done
mp=$(awk '$1=="munged"{print $2}' "$RT/pids" 2>/dev/null)
if pid_is "$mp" /usr/sbin/munged; then echo "munged: pid $mp (root namespace, socket $RT/munge/munge.socket.2)"
else echo "munged: NOT RUNNING"; bad=1; fi

if [ -e "/run/netns/${P}login" ]; then
  echo; echo "== sinfo -N -l (on login)"
  on login timeout 10 sinfo -N -l || { echo "$ME: sinfo failed (slurmctld down?)"; bad=1; }
  echo; echo "== squeue (on login)"
  on login timeout 10 squeue || bad=1
fi
if [ "$bad" != 0 ]; then echo "$ME: testbed at $RT is up but DEGRADED (see above)" >&2; exit 3; fi
