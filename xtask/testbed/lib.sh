# lib.sh - shared by up.sh, down.sh, status.sh, fault.sh and verify.sh (sourced, not run).
# shellcheck shell=bash
#
# Parameters (environment, all optional):
#   TB_RT        runtime dir (deleted by down.sh)              default /tmp/daphne-testbed
#   TB_PREFIX    network namespace / veth name prefix          default dtb-
#   TB_NET       first three octets of the private /24         default 10.77.0
#   TB_BRIDGE    bridge name                                   default dtbbr0
#   TB_NODES     number of compute nodes (node1..nodeN)        default 3
#   TB_CPUS      CPUs per node advertised to SLURM             default 16
#   TB_NODE_SSHD 1: also run sshd on every compute node        default 1
# Once a testbed is up, the scripts other than up.sh take TB_PREFIX, TB_NET, TB_BRIDGE, TB_NODES,
# TB_CPUS and TB_NODE_SSHD from $TB_RT/testbed.env, so only TB_RT has to match.

# shellcheck disable=SC2034  # used by the scripts that source this file
TB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_RT=${TB_RT:-/tmp/daphne-testbed}
TB_RT=${TB_RT%/}

# tb_load_env: take the parameters of the testbed that is up at $TB_RT (if any): from testbed.env,
# or from the params file that up.sh writes first (a half-built testbed).
tb_load_env() {
  local f=$TB_RT/testbed.env k v
  [ -r "$f" ] || f=$TB_RT/params
  [ -r "$f" ] || return 1
  while IFS='=' read -r k v; do
    case $k in
      TB_PREFIX|TB_NET|TB_BRIDGE|TB_NODES|TB_CPUS|TB_NODE_SSHD) printf -v "$k" '%s' "$v" ;;
    esac
  done < "$f"
}

tb_defaults() {
  TB_PREFIX=${TB_PREFIX:-dtb-}
  TB_NET=${TB_NET:-10.77.0}
  TB_BRIDGE=${TB_BRIDGE:-dtbbr0}
  TB_NODES=${TB_NODES:-3}
  TB_CPUS=${TB_CPUS:-16}
  TB_NODE_SSHD=${TB_NODE_SSHD:-1}
  P=$TB_PREFIX
  RT=$TB_RT
  NODES=(); local i
  for ((i = 1; i <= TB_NODES; i++)); do NODES+=("node$i"); done
  HOSTS=(login "${NODES[@]}")
}

# tb_validate NAME: die with a clear message on a bad parameter.
tb_validate() {
  local me=$1
  case $TB_RT in
    /*) ;; *) echo "$me: TB_RT must be an absolute path (got '$TB_RT')" >&2; exit 2 ;;
  esac
  case $TB_RT in
    *[[:space:]=]*|/|/tmp|/work|/root|/etc|/usr|/var|/run)
      echo "$me: refusing TB_RT='$TB_RT' (no whitespace or '=', and not a system directory)" >&2; exit 2 ;;
  esac
  [[ $TB_PREFIX =~ ^[a-z][a-z0-9]{0,5}-?$ ]] || { echo "$me: TB_PREFIX must be 1-7 chars [a-z0-9], optionally ending in '-' (got '$TB_PREFIX')" >&2; exit 2; }
  [[ $TB_BRIDGE =~ ^[a-zA-Z][a-zA-Z0-9_-]{0,14}$ ]] || { echo "$me: bad TB_BRIDGE '$TB_BRIDGE' (max 15 chars)" >&2; exit 2; }
  [[ $TB_NET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || { echo "$me: TB_NET must be three octets like 10.77.0 (got '$TB_NET')" >&2; exit 2; }
  if ! [[ $TB_NODES =~ ^[1-9][0-9]?$ ]]; then echo "$me: TB_NODES must be 1..99 (got '$TB_NODES')" >&2; exit 2; fi
  [[ $TB_CPUS =~ ^[1-9][0-9]*$ ]] || { echo "$me: TB_CPUS must be a positive integer (got '$TB_CPUS')" >&2; exit 2; }
  [[ $TB_NODE_SSHD =~ ^[01]$ ]] || { echo "$me: TB_NODE_SSHD must be 0 or 1 (got '$TB_NODE_SSHD')" >&2; exit 2; }
}

tb_require_root() { [ "$(id -u)" = 0 ] || { echo "$1: must run as root" >&2; exit 1; }; }

# addr HOST: the host's address (gw = the bridge in the root namespace)
addr() {
  case $1 in
    gw) echo "$TB_NET.1" ;;
    login) echo "$TB_NET.10" ;;
    node*) echo "$TB_NET.$((10 + ${1#node}))" ;;
    *) return 1 ;;
  esac
}

is_host() { local h; for h in "${HOSTS[@]}"; do [ "$h" = "$1" ] && return 0; done; return 1; }

# on HOST CMD...: run CMD "on" HOST (its netns, hostname, /etc/hosts and /etc/slurm)
on() { local h=$1; shift; ip netns exec "$P$h" nsenter --uts="$RT/ns/$h" "$@"; }

# our_netns: the namespaces of this testbed that exist now
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}(login|node[0-9]+)\$" || true; }

# alive PID...: print the PIDs that exist and are not zombies
alive() {
  local p s
  for p in "$@"; do
    s=$(awk '/^State:/{print $2}' "/proc/$p/status" 2>/dev/null) || continue
    [ -n "$s" ] && [ "$s" != Z ] && echo "$p"
  done
  return 0
}

# pid_is PID EXE: PID is alive and runs EXE (symlinks resolved: Debian's /usr/sbin/slurmd is an
# alternatives link to slurmd-wlm)
pid_is() {
  [ -n "$1" ] && [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$(readlink -f "$2")" ] && [ -n "$(alive "$1")" ]
}

# ns_pids HOST: processes living in HOST's network namespace
ns_pids() { ip netns pids "$P$1" 2>/dev/null || true; }

# ns_daemon HOST EXE: PIDs in HOST's namespace that run EXE
ns_daemon() { local p; for p in $(ns_pids "$1"); do pid_is "$p" "$2" && echo "$p"; done; return 0; }

now_ns() { date +%s%N; }
# elapsed T0: seconds since T0 (from now_ns), two decimals
elapsed() { local d=$(( $(now_ns) - $1 )); printf '%d.%02d' $((d / 1000000000)) $((d / 10000000 % 100)); }

# waitfor WHAT TIMEOUT_S CMD...: poll CMD every 50 ms until it succeeds
waitfor() {
  local what=$1 tmo=$2; shift 2
  local end=$(( $(date +%s) + tmo ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then echo "timeout ($tmo s) waiting for $what" >&2; return 1; fi
    sleep 0.05
  done
}

# record KIND NAME PID: append to $RT/pids ("name pid" lines; read by down.sh and fault.sh)
record_pid() { echo "$1 $2" >> "$RT/pids"; }

# The slurmd cgroup shim: `ip netns exec` remounts /sys, so /sys/fs/cgroup is empty and slurmd 22.05
# refuses to start even with proctrack/linuxproc. Give slurmd (in its own mount namespace) a tmpfs
# there plus the controller-less name=systemd v1 hierarchy.
CGSHIM='mount -t tmpfs -o mode=755 dtb-cgroup /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd'

# start_slurmd NODE: start slurmd on NODE in the background, record its PID
start_slurmd() {
  local n=$1
  setsid ip netns exec "$P$n" sh -c "$CGSHIM && exec nsenter --uts='$RT/ns/$n' /usr/sbin/slurmd -D" \
    </dev/null >>"$RT/log/slurmd-$n.stdout" 2>&1 &
  record_pid "slurmd-$n" $!
}

# start_slurmctld: start slurmctld on login in the background, record its PID
start_slurmctld() {
  setsid ip netns exec "${P}login" nsenter --uts="$RT/ns/login" /usr/sbin/slurmctld -D -i \
    </dev/null >>"$RT/log/slurmctld.stdout" 2>&1 &
  record_pid slurmctld $!
}

# start_sshd HOST: start sshd on HOST in the background (log: $RT/log/sshd-HOST.log), record its PID
start_sshd() {
  local h=$1
  setsid ip netns exec "$P$h" nsenter --uts="$RT/ns/$h" /usr/sbin/sshd -D -e -f "$RT/ssh/sshd_config-$h" \
    </dev/null >>"$RT/log/sshd-$h.log" 2>&1 &
  record_pid "sshd-$h" $!
}

# tcp_open ADDR PORT: a TCP connection to ADDR:PORT succeeds (from the root namespace)
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
