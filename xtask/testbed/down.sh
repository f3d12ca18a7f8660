#!/bin/bash
# down.sh - tear down what up.sh created. Safe to run repeatedly, on a half-built testbed, and when
# nothing is up (exit 0). Same parameters as up.sh; when $TB_RT/testbed.env (or params) exists, the
# testbed's own TB_PREFIX/TB_BRIDGE/TB_NET/TB_NODES are taken from there.
# Kills ONLY: processes living in our network namespaces (daemons, slurmstepd, job tasks, ssh
# sessions) and the recorded daemon PIDs after checking that they are ours. Never by process name.
set -uo pipefail
ME=down.sh
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
T0=$(now_ns)
tb_require_root "$ME"
tb_load_env || true
tb_defaults
tb_validate "$ME"
CREATED=$RT/created
rc=0
did=0

# owner_rt NS: the runtime dir of the testbed that owns NS (its /etc/netns/NS/hosts points there)
owner_rt() { local t; t=$(readlink "/etc/netns/$1/hosts" 2>/dev/null) || return 1; echo "${t%/etc/hosts}"; }
# mine NS: NS belongs to this testbed (or is an orphan with our prefix, from a half-built run)
mine() { local o; o=$(owner_rt "$1") || return 0; [ "$o" = "$RT" ]; }

# our namespaces: those recorded by up.sh plus those matching the prefix, minus another testbed's
OURNS=""
for ns in $( { our_netns; [ -f "$CREATED" ] && awk '$1=="netns"{print $2}' "$CREATED"; } | sort -u); do
  if mine "$ns"; then OURNS="$OURNS $ns"
  else echo "$ME: leaving $ns: it belongs to the testbed at $(owner_rt "$ns") (TB_RT differs)" >&2; fi
done
existing_ns() { local ns; for ns in $OURNS; do [ -e "/run/netns/$ns" ] && echo "$ns"; done; return 0; }
nspids() { local ns; for ns in $(existing_ns); do ip netns pids "$ns" 2>/dev/null; done | sort -un; }

# ------------------------------------------------------------------------ 1. processes in our namespaces
# SIGKILL at once: the state is thrown away anyway, and slurmstepd ignores SIGTERM.
for _ in $(seq 1 100); do
  # shellcheck disable=SC2046
  PIDS=$(alive $(nspids))
  [ -z "$PIDS" ] && break
  did=1
  # shellcheck disable=SC2086
  kill -KILL $PIDS 2>/dev/null
  sleep 0.05
done
# shellcheck disable=SC2046
left=$(alive $(nspids))
if [ -n "$left" ]; then echo "$ME: WARNING: processes survive in our namespaces: $left" >&2; rc=1; fi

# ------------------------------------------------------------------------ 2. recorded daemons
# (munged lives in the root namespace; the others normally died above, but a namespace may already
# be gone.) Each PID is checked to still be our daemon before it is signalled.
uts_inode() { stat -L -c %i "$RT/ns/$1" 2>/dev/null; }
ours() {  # ours NAME PID
  local name=$1 pid=$2 cmd exe h
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [ -n "$(alive "$pid")" ] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline")
  case $name in
    munged) [ "$exe" = "$(readlink -f /usr/sbin/munged)" ] && [[ $cmd == *"--socket=$RT/munge/"* ]] ;;
    sshd-*) [ "$exe" = "$(readlink -f /usr/sbin/sshd)" ] && [[ $cmd == *"$RT/ssh/sshd_config-"* ]] ;;
    slurmctld|slurmd-*)
      [ "$exe" = "$(readlink -f "/usr/sbin/${name%%-*}")" ] || return 1
      h=login; [ "$name" = slurmctld ] || h=${name#slurmd-}
      [ -n "$(uts_inode "$h")" ] && [ "$(stat -L -c %i "/proc/$pid/ns/uts" 2>/dev/null)" = "$(uts_inode "$h")" ] ;;
    *) return 1 ;;
  esac
}
if [ -f "$RT/pids" ]; then
  while read -r name pid; do
    [ -n "$pid" ] || continue
    if ours "$name" "$pid"; then
      did=1
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 1 40); do [ -z "$(alive "$pid")" ] && break; sleep 0.05; done
      [ -n "$(alive "$pid")" ] && kill -KILL "$pid" 2>/dev/null
    fi
  done < "$RT/pids"
fi

# ------------------------------------------------------------------------ 3. UTS namespace mounts
if [ -d "$RT/ns" ]; then
  for f in "$RT"/ns/*; do
    if mountpoint -q "$f" 2>/dev/null; then umount "$f" 2>/dev/null || umount -l "$f"; did=1; fi
  done
  if mountpoint -q "$RT/ns" 2>/dev/null; then umount "$RT/ns" 2>/dev/null || umount -l "$RT/ns"; did=1; fi
fi

# ------------------------------------------------------------------------ 4. namespaces, links, /etc/netns
for ns in $(existing_ns); do ip netns del "$ns" && did=1; done
ETCNS=$( { for ns in $OURNS; do echo "/etc/netns/$ns"; done
           [ -f "$CREATED" ] && awk '$1=="etcnetns"{print $2}' "$CREATED"
           for d in /etc/netns/"$P"login /etc/netns/"$P"node*; do [ -e "$d" ] && echo "$d"; done; } | sort -u)
for d in $ETCNS; do
  case $d in /etc/netns/"$P"*) ;; *) continue ;; esac
  if [ -e "$d" ] && mine "${d#/etc/netns/}"; then rm -rf "$d"; did=1; fi
done
# veths: ours, recorded ones, and orphans with our prefix whose namespace is gone
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${P}v-" || true); do
  ns=$P${l#"${P}v-"}
  if [[ " $OURNS " == *" $ns "* ]] || [ ! -e "/run/netns/$ns" ]; then ip link del "$l" 2>/dev/null && did=1; fi
done
# the bridge: only when no other testbed's veth is still attached to it
if ip link show "$TB_BRIDGE" >/dev/null 2>&1; then
  ports=$(ip -o link show master "$TB_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | paste -sd' ' -)
  if [ -z "$ports" ]; then ip link del "$TB_BRIDGE" && did=1
  else echo "$ME: leaving bridge $TB_BRIDGE: other links are still attached ($ports)" >&2; fi
fi

# Shared directories: removed only if up.sh created them and nobody else needs them. If another
# testbed still uses one, it inherits the duty to remove it (a line in its own $RT/created).
hand_over() {  # hand_over DIR OTHER_RT
  if [ -f "$2/created" ] && ! grep -qx "dir $1" "$2/created"; then
    echo "dir $1" >> "$2/created"
    echo "$ME: note: leaving $1 to the testbed at $2 (still uses it)"
  elif [ ! -f "$2/created" ]; then
    echo "$ME: note: leaving $1 (still used by $2)"
  fi
}
if [ -f "$CREATED" ] && grep -qx "dir /etc/netns" "$CREATED" && [ -d /etc/netns ]; then
  if ! rmdir /etc/netns 2>/dev/null; then
    other=""
    for d in /etc/netns/*; do other=$(readlink "$d/hosts" 2>/dev/null) && break; done
    if [ -n "$other" ]; then hand_over /etc/netns "${other%/etc/hosts}"
    else echo "$ME: note: leaving /etc/netns (not empty)"; fi
  fi
fi
if [ -f "$CREATED" ] && grep -qx "dir /run/sshd" "$CREATED" && [ -d /run/sshd ]; then
  other=""
  sshd_exe=$(readlink -f /usr/sbin/sshd)
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/exe" 2>/dev/null)" = "$sshd_exe" ] || continue
    # (sshd rewrites its process title: "sshd: /usr/sbin/sshd -D -e -f RT/ssh/sshd_config-HOST [listener] ...")
    other=$(tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -o '/[^ ]*/ssh/sshd_config-[a-z0-9]*' | head -1)
    other=${other%/ssh/sshd_config-*}
    [ -n "$other" ] || other="(an sshd not started by a testbed: pid ${p#/proc/})"
    break
  done
  if [ -z "$other" ]; then rmdir /run/sshd 2>/dev/null || true
  else hand_over /run/sshd "$other"; fi
fi

# ------------------------------------------------------------------------ 5. runtime dir
if [ -d "$RT" ]; then
  if findmnt -rno TARGET | grep -q "^$RT\(/\|\$\)"; then
    echo "$ME: ERROR: mounts remain under $RT, not deleting it:" >&2
    findmnt -rno TARGET | grep "^$RT\(/\|\$\)" >&2
    rc=1
  else
    rm -rf "$RT"; did=1
  fi
fi

if [ "$did" = 0 ]; then
  echo "$ME: nothing to tear down (TB_RT=$RT, TB_PREFIX=$P)"
else
  echo "$ME: torn down in $(elapsed "$T0") s"
fi
exit $rc
