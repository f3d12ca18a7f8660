#!/bin/bash
# verify.sh - smoke test of a running testbed: one PASS/FAIL line per check, exit 1 if any failed.
#   TB_VERIFY_SIF=/abs/path/image.sif   also run `srun apptainer exec IMAGE hostname` on all nodes
#   TB_VERIFY_NO_CRASH=1                skip the node-crash check (it takes ~10 s)
# The crash check kills the last node and brings it back (slurmd and sshd), so the testbed is whole
# again at the end.
set -uo pipefail
ME=verify.sh
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tb_require_root "$ME"
if ! tb_load_env || [ ! -f "$TB_RT/testbed.env" ]; then
  echo "$ME: no testbed is up at TB_RT=$TB_RT (start one with $TB_DIR/up.sh)" >&2; exit 1
fi
tb_defaults
T0=$(now_ns)
J=$RT/jobs/verify.$$
mkdir -p "$J"
SSHC=(ssh -F "$RT/ssh/ssh_config")
N=$TB_NODES
LAST=node$N
MSOCK=$RT/munge/munge.socket.2
ok=0 bad=0
pass() { echo "PASS $1"; ok=$((ok + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; bad=$((bad + 1)); }
# chk NAME CMD...: PASS if CMD succeeds
chk() { local n=$1; shift; if "$@"; then pass "$n"; else fail "$n"; fi; }
note() { echo "     $*"; }
slurm() { on login timeout 30 "$@"; }
# wait_job JOBID: until the job has left the queue (max 60 s)
wait_job() { local i; for i in $(seq 1 600); do slurm squeue -h -j "$1" 2>/dev/null | grep -q . || return 0; sleep 0.1; done; return 1; }
join() { local IFS=,; echo "$*"; }
expect_nodes=$(join "${NODES[@]}")

# ------------------------------------------------------------------------ munge, sinfo, srun
chk munge sh -c "munge -n -S '$MSOCK' </dev/null | unmunge -S '$MSOCK' >/dev/null"
idle=$(slurm sinfo -h -p debug -t idle -o %D 2>/dev/null)
if [ "$idle" = "$N" ]; then pass "sinfo: $N idle nodes"; else fail "sinfo: $N idle nodes" "got '$idle'"; fi

# (stdout only: srun may say "job N queued and waiting for resources" on stderr while the previous
# job's nodes are still completing)
H=$(slurm srun -N"$N" hostname 2>"$J/err" | sort | paste -sd, -)
if [ "$H" = "$expect_nodes" ]; then pass "srun -N$N hostname -> $H"; else fail "srun -N$N hostname" "got '$H' $(cat "$J/err")"; fi

H=$(SLURM_CONF=$RT/etc/slurm/slurm.conf timeout 30 srun -N"$N" hostname 2>"$J/err" | sort | paste -sd, -)
if [ "$H" = "$expect_nodes" ]; then pass "srun from the root namespace (SLURM_CONF=...)"; else fail "srun from the root namespace" "got '$H' $(cat "$J/err")"; fi

# all advertised CPUs usable: TB_CPUS tasks per node
t=$(now_ns)
cnt=$(slurm srun -N"$N" --ntasks-per-node="$TB_CPUS" hostname 2>"$J/err" | sort | uniq -c | awk '{print $2"="$1}' | paste -sd, -)
want=$(for n in "${NODES[@]}"; do echo "$n=$TB_CPUS"; done | paste -sd, -)
if [ "$cnt" = "$want" ]; then pass "srun $((N * TB_CPUS)) tasks, $TB_CPUS per node ($(elapsed "$t") s)"; else fail "srun $((N * TB_CPUS)) tasks" "got '$cnt'"; fi

# ------------------------------------------------------------------------ sbatch, 2 tasks per node
cat > "$J/tasks.sh" <<'EOF'
#!/bin/bash
#SBATCH --ntasks-per-node=2
echo "batch on $(hostname), nodes $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)"
srun sh -c 'echo $(hostname):$((50000+SLURM_LOCALID))'
EOF
t=$(now_ns)
JID=$(slurm sbatch --parsable -N"$N" -o "$J/tasks-%j.out" -D "$J" "$J/tasks.sh" 2>&1)
if [[ $JID =~ ^[0-9]+$ ]] && wait_job "$JID"; then
  out=$(grep -E '^node[0-9]+:5000[0-9]$' "$J/tasks-$JID.out" | sort | paste -sd' ' -)
  want=$(for n in "${NODES[@]}"; do echo "$n:50000 $n:50001"; done | paste -sd' ' -)
  if [ "$out" = "$want" ]; then pass "sbatch --ntasks-per-node=2: $((2 * N)) tasks ($(elapsed "$t") s)"
  else fail "sbatch --ntasks-per-node=2" "got '$out'"; sed 's/^/     /' "$J/tasks-$JID.out"; fi
else
  fail "sbatch --ntasks-per-node=2" "sbatch said '$JID' or the job did not finish"
fi

# ------------------------------------------------------------------------ partition limit
if out=$(slurm sbatch --parsable -p short -t 5 -o /dev/null --wrap true 2>&1); then
  fail "partition short rejects --time=5" "accepted: $out"
  [[ $out =~ ^[0-9]+$ ]] && slurm scancel "$out"
else
  pass "partition short (MaxTime=1) rejects --time=5: ${out#sbatch: error: }"
fi

# ------------------------------------------------------------------------ scancel leaves no process
MARK=$((7000000 + RANDOM))
# count_marked: processes in the nodes' namespaces running `sleep $MARK` / `sleep $((MARK+1))`
count_marked() {
  local n p c=0
  for n in "${NODES[@]}"; do
    for p in $(ns_pids "$n"); do
      case "$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline")" in "sleep $MARK "|"sleep $((MARK + 1)) ") c=$((c + 1)) ;; esac
    done
  done
  echo "$c"
}
cat > "$J/cancel.sh" <<EOF
#!/bin/bash
#SBATCH --ntasks-per-node=2
# one sleep escapes the step via setsid: scancel must still kill it
srun sh -c 'setsid sleep $MARK & sleep $((MARK + 1)); wait'
EOF
JID=$(slurm sbatch --parsable -N"$N" -o "$J/cancel-%j.out" -D "$J" "$J/cancel.sh" 2>&1)
want=$((4 * N)); c=0
for _ in $(seq 1 100); do c=$(count_marked); [ "$c" -ge "$want" ] && break; sleep 0.1; done
note "job $JID: $c of $want marked sleeps running before scancel"
slurm scancel "$JID"
t=$(now_ns)
for _ in $(seq 1 200); do c=$(count_marked); [ "$c" = 0 ] && break; sleep 0.05; done
if [ "$c" = 0 ]; then pass "scancel leaves no process of the job (gone after $(elapsed "$t") s)"
else fail "scancel leaves no process" "$c still running"; fi

# ------------------------------------------------------------------------ cross-node TCP
if [ "$N" -ge 2 ]; then
  PORT=$((20000 + RANDOM % 20000))
  # node2 listens (perl-base is on every Debian), node1 connects with bash's /dev/tcp
  cat > "$J/tcp-task.sh" <<'EOF'
#!/bin/bash
port=$1
if [ "$(hostname)" = node2 ]; then
  exec timeout 20 perl -MIO::Socket::INET -e '
    my $s = IO::Socket::INET->new(LocalAddr => "node2", LocalPort => $ARGV[0], Listen => 1, ReuseAddr => 1)
      or die "listen: $!";
    my $c = $s->accept; print $c "hello from node2 to ", $c->peerhost, "\n"; close $c;' "$port"
else
  for _ in $(seq 100); do { exec 3<>"/dev/tcp/node2/$port"; } 2>/dev/null && break; sleep 0.1; done
  read -r line <&3; echo "$(hostname) got: $line"
fi
EOF
  printf '#!/bin/bash\nsrun -l bash %q %s\n' "$J/tcp-task.sh" "$PORT" > "$J/tcp.sh"
  JID=$(slurm sbatch --parsable -N2 -w node1,node2 --ntasks-per-node=1 -o "$J/tcp-%j.out" -D "$J" "$J/tcp.sh" 2>&1)
  if [[ $JID =~ ^[0-9]+$ ]] && wait_job "$JID" && grep -q "node1 got: hello from node2 to $(addr node1)" "$J/tcp-$JID.out"; then
    pass "cross-node TCP between job tasks (node1 -> node2:$PORT)"
  else
    fail "cross-node TCP between job tasks"; sed 's/^/     /' "$J/tcp-$JID.out" 2>/dev/null
  fi
fi

# ------------------------------------------------------------------------ ssh
LOG=$RT/log/sshd-login.log
before=$(grep -c 'Accepted publickey for root from' "$LOG")
h=$("${SSHC[@]}" login hostname 2>&1)
if [ "$h" = login ]; then pass "ssh login hostname -> login"; else fail "ssh login hostname" "got '$h'"; fi
h=$(ssh -i "$RT/ssh/id_ed25519" -o IdentitiesOnly=yes -o UserKnownHostsFile="$RT/ssh/known_hosts" \
      -o StrictHostKeyChecking=yes -o BatchMode=yes root@"$(addr login)" hostname 2>&1)
if [ "$h" = login ]; then pass "ssh root@$(addr login) with key + known_hosts only (no ssh_config)"; else fail "ssh by IP" "got '$h'"; fi
sleep 0.1
after=$(grep -c 'Accepted publickey for root from' "$LOG")
if [ $((after - before)) = 2 ]; then pass "sshd log counts handshakes (+2 'Accepted publickey')"; else fail "sshd log handshake count" "before $before after $after"; fi
H=$("${SSHC[@]}" login srun -N"$N" hostname 2>"$J/err" | sort | paste -sd, -)
if [ "$H" = "$expect_nodes" ]; then pass "ssh login srun -N$N hostname"; else fail "ssh login srun" "got '$H'"; fi
if [ "$TB_NODE_SSHD" = 1 ]; then
  h=$("${SSHC[@]}" node1 hostname 2>&1)
  if [ "$h" = node1 ]; then pass "ssh node1 hostname -> node1"; else fail "ssh node1 hostname" "got '$h'"; fi
fi
echo "data-$RANDOM-$(date +%s%N)" > "$J/f.txt"
chk "rsync over ssh" sh -c "rsync -a -e 'ssh -F $RT/ssh/ssh_config' '$J/f.txt' 'login:$J/f.rsync' && cmp -s '$J/f.txt' '$J/f.rsync'"

# ------------------------------------------------------------------------ apptainer inside a step
if [ -n "${TB_VERIFY_SIF:-}" ]; then
  t=$(now_ns)
  H=$(slurm srun -N"$N" apptainer exec "$TB_VERIFY_SIF" hostname 2>"$J/err" | sort | paste -sd, -)
  if [ "$H" = "$expect_nodes" ]; then pass "srun -N$N apptainer exec $TB_VERIFY_SIF hostname ($(elapsed "$t") s)"
  else fail "srun apptainer exec" "got '$H' $(cat "$J/err")"; fi
else
  note "skip apptainer check (set TB_VERIFY_SIF=/abs/path/image.sif)"
fi

# ------------------------------------------------------------------------ node crash and recovery
state() { slurm sinfo -h -p debug -n "$1" -o %T 2>/dev/null | head -1; }
if [ "${TB_VERIFY_NO_CRASH:-0}" = 1 ]; then
  note "skip node crash check (TB_VERIFY_NO_CRASH=1)"
else
  "$TB_DIR/fault.sh" crash "$LAST" >/dev/null
  t=$(now_ns); nr=""; st=""
  for _ in $(seq 1 300); do
    st=$(state "$LAST")
    [ -z "$nr" ] && [[ $st == *'*' ]] && nr=$(elapsed "$t")
    [[ $st == down* ]] && break
    sleep 0.1
  done
  td=$(elapsed "$t")
  if [[ $st == down* ]] && [ "${td%.*}" -lt 15 ]; then pass "crashed $LAST: not responding after ${nr:-?} s, DOWN after $td s"
  else fail "crashed $LAST marked DOWN within 15 s" "state '$st' after $td s"; fi
  "$TB_DIR/fault.sh" restart-slurmd "$LAST" >/dev/null
  t=$(now_ns)
  for _ in $(seq 1 150); do st=$(state "$LAST"); [ "$st" = idle ] && break; sleep 0.1; done
  if [ "$st" = idle ]; then pass "restart-slurmd $LAST: idle again after $(elapsed "$t") s"; else fail "restart-slurmd $LAST" "state '$st'"; fi
  if [ "$TB_NODE_SSHD" = 1 ]; then
    "$TB_DIR/fault.sh" restart-sshd "$LAST" >/dev/null
    h=$("${SSHC[@]}" "$LAST" hostname 2>&1)
    if [ "$h" = "$LAST" ]; then pass "restart-sshd $LAST: ssh works again"; else fail "restart-sshd $LAST" "got '$h'"; fi
  fi
fi

rm -rf "$J"
echo "$ME: $(elapsed "$T0") s"
echo "RESULT: $ok passed, $bad failed"
[ "$bad" = 0 ]
