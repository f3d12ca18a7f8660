#!/usr/bin/env bash
# test.sh - self-test of the DAPHNE stand-in.
#
# Cleans and builds both targets in this tree, starts workers on 127.0.0.1
# (ports picked by trying; set DAPHNE_TEST_PORT_BASE to start from a given
# port), exercises the coordinator and the worker, and prints one PASS/FAIL
# line per check.  Every process it starts is killed by PID on exit, also on
# failure or interruption.  Exit status: 0 when every check passed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
here="$(pwd)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/daphne-standin-test.XXXXXX")"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # give each a moment, then insist
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

PASSED=0
FAILED=0
pass() { echo "PASS: $1"; PASSED=$((PASSED + 1)); }
fail() {
    echo "FAIL: $1"
    shift
    local line
    for line in "$@"; do echo "      $line"; done
    FAILED=$((FAILED + 1))
}
# check NAME CONDITION-COMMAND... : PASS when the command succeeds.
check() {
    local name="$1"; shift
    if "$@"; then pass "$name"; else fail "$name" "rc=${RC:-?}" "stdout: $(head -c 600 "$TMP/out" 2>/dev/null)" "stderr: $(head -c 600 "$TMP/err" 2>/dev/null)"; fi
}

# run CMD... : run with a time limit, stdout -> $TMP/out, stderr -> $TMP/err, status -> RC.
run() {
    timeout 60 "$@" >"$TMP/out" 2>"$TMP/err"
    RC=$?
}
out_is() { [[ "$(cat "$TMP/out")" == "$1" ]]; }
out_has() { grep -qF -- "$1" "$TMP/out"; }
err_has() { grep -qF -- "$1" "$TMP/err"; }
rc_is() { [[ "$RC" -eq "$1" ]]; }

SCRIPT="$here/../deploy/examples/sum.daph"
if [[ ! -f "$SCRIPT" ]]; then
    SCRIPT="$TMP/sum.daph"
    printf 'n = $n;\ns = sum(seq(1, n, 1) ^ 2);\nprint(s);\n' >"$SCRIPT"
fi
HOST="$(uname -n)"

# sumsq LO HI: sum of i*i for i in [LO, HI] (small values only, bash is 64-bit)
sumsq() {
    local lo=$1 hi=$2 s=0 i
    for ((i = lo; i <= hi; i++)); do s=$((s + i * i)); done
    echo "$s"
}

# wait_exit PID SECONDS : wait for a child to exit, set WRC to its status (124 on timeout).
wait_exit() {
    local pid=$1 limit=$(( $2 * 10 )) k
    for ((k = 0; k < limit; k++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then WRC=124; return; fi
    wait "$pid"
    WRC=$?
    forget_pid "$pid"
}

# forget_pid PID : drop a reaped child from PIDS so cleanup never signals a reused pid.
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ "$p" != "$1" ]] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# start_worker NAME [extra args...] : start a worker on 127.0.0.1 at a free
# port (found by trying).  Sets WPORT, WPID; logs in $TMP/NAME.log / .err.
next_port=${DAPHNE_TEST_PORT_BASE:-$((20000 + RANDOM % 30000))}
start_worker() {
    local name=$1; shift
    local attempt k
    WPORT=""; WPID=""
    for ((attempt = 0; attempt < 30; attempt++)); do
        local port=$next_port
        next_port=$((next_port + 1))
        bin/DistributedWorker "127.0.0.1:$port" "$@" >"$TMP/$name.log" 2>"$TMP/$name.err" &
        local pid=$!
        PIDS+=("$pid")
        for ((k = 0; k < 50; k++)); do
            grep -q "^Started Distributed Worker on \`127.0.0.1:$port\`\$" "$TMP/$name.log" && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if grep -q "^Started Distributed Worker on \`127.0.0.1:$port\`\$" "$TMP/$name.log"; then
            WPORT=$port; WPID=$pid
            return 0
        fi
        wait_exit "$pid" 2
        if ! grep -q "Address already in use" "$TMP/$name.err"; then
            echo "worker failed to start: $(cat "$TMP/$name.err")" >&2
            return 1
        fi
    done
    return 1
}

echo "== build"
run ./build.sh --clean
check "build.sh --clean exits 0 and removes build/ bin/ lib/" \
    eval 'rc_is 0 && [[ ! -e build && ! -e bin && ! -e lib ]]'

start_ns=$(date +%s%N)
run ./build.sh
build_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
check "clean build of target daphne (${build_ms} ms)" \
    eval 'rc_is 0 && out_has "Build succeeded: bin/daphne" && [[ -x bin/daphne && -f lib/libdaphnekernels.so ]]'
check "no compiler warnings" eval '! grep -qi "warning" "$TMP/out" "$TMP/err"'
check "clean build takes less than 10 s" eval '[[ $build_ms -lt 10000 ]]'

run ./build.sh --target DistributedWorker -nd -nf -y --mpi --cuda --installPrefix "$TMP/prefix"
check "build --target DistributedWorker (with accepted upstream flags)" \
    eval 'rc_is 0 && out_has "Build succeeded: bin/DistributedWorker" && [[ -x bin/DistributedWorker ]]'
check "installPrefix is recorded in the build log" eval 'out_has "$TMP/prefix"'
check "building DistributedWorker leaves bin/daphne in place" eval '[[ -x bin/daphne ]]'

run ./build.sh --target DistributedWorker
check "incremental rebuild compiles nothing" \
    eval 'rc_is 0 && ! out_has "Compiling" && out_has "Build succeeded: bin/DistributedWorker"'

run ./build.sh --bogus
check "unknown build flag: exit 1 with usage" eval 'rc_is 1 && err_has "Usage: ./build.sh"'
run ./build.sh --target nope
check "unknown target: exit 1" eval 'rc_is 1 && err_has "unknown target"'

check "bin/git_source_status_info is written" eval '[[ -s bin/git_source_status_info ]]'

run ldd bin/daphne bin/DistributedWorker
check "both binaries load lib/libdaphnekernels.so (ldd)" \
    eval 'rc_is 0 && [[ $(grep -c "libdaphnekernels.so => .*/lib/libdaphnekernels.so" "$TMP/out") -eq 2 ]] && ! out_has "not found"'
if command -v readelf >/dev/null 2>&1; then
    run readelf -d bin/daphne
    check "RPATH/RUNPATH is \$ORIGIN/../lib" eval 'out_has "[\$ORIGIN/../lib]"'
fi

mkdir -p "$TMP/reloc"
cp -R bin lib "$TMP/reloc/"
run "$TMP/reloc/bin/daphne" "$SCRIPT" n=10
check "bin/ + lib/ tree is relocatable" eval 'rc_is 0 && out_is "result: 385"'
run ldd "$TMP/reloc/bin/DistributedWorker"
check "relocated worker resolves the relocated library" eval 'out_has "$TMP/reloc/bin/../lib/libdaphnekernels.so"'

echo "== coordinator (local)"
run bin/daphne "$SCRIPT" n=1000
check "local n=1000 gives result: 333833500" eval 'rc_is 0 && out_is "result: 333833500"'
run bin/daphne "$SCRIPT"
check "local default n=1000000" eval 'rc_is 0 && out_is "result: 333333833333500000"'
run bin/daphne "$SCRIPT" n=1000000000
check "local n=10^9 (128-bit sum)" eval 'rc_is 0 && out_is "result: 333333333833333333500000000"'
run bash -c 'bin/daphne --vec --select-matrix-repr --explain=kernels - n=3 < "$1"' _ "$SCRIPT"
check "script from stdin (-) and accepted options" eval 'rc_is 0 && out_is "result: 14"'
run bin/daphne --help
check "--help exits 0" eval 'rc_is 0 && out_has "Usage: daphne"'
run bin/daphne --bogus "$SCRIPT"
check "unknown option: exit 1 with usage" eval 'rc_is 1 && err_has "--bogus" && err_has "Usage: daphne"'
run bin/daphne "$SCRIPT" n=5 justaword
check "script arg without '=': exit 1 naming it" eval 'rc_is 1 && err_has "justaword"'
run bin/daphne "$SCRIPT" n=abc
check "bad n: exit 1 naming n" eval 'rc_is 1 && err_has "argument n"'
run bin/daphne "$SCRIPT" n=1000000001
check "n above 10^9: exit 1" eval 'rc_is 1 && err_has "argument n"'
run bin/daphne "$TMP/does-not-exist.daph"
check "missing script: exit 1" eval 'rc_is 1 && err_has "does-not-exist.daph"'
run bin/daphne --distributed --dist_backend=MPI "$SCRIPT"
check "--dist_backend=MPI: exit 3" \
    eval 'rc_is 3 && err_has "error: the stand-in was built without MPI support (--dist_backend=MPI)"'
run bin/daphne --dist_backend=gRPC "$SCRIPT"
check "unknown --dist_backend: exit 1" eval 'rc_is 1'
run env -u DISTRIBUTED_WORKERS bin/daphne --distributed "$SCRIPT"
check "missing DISTRIBUTED_WORKERS: exit 1" \
    eval 'rc_is 1 && err_has "DISTRIBUTED_WORKERS is empty; set it to host:port,..."'
run env DISTRIBUTED_WORKERS= bin/daphne --distributed "$SCRIPT"
check "empty DISTRIBUTED_WORKERS: exit 1" eval 'rc_is 1 && err_has "DISTRIBUTED_WORKERS is empty"'

echo "== workers"
ports=()
wpids=()
for i in 1 2 3; do
    if start_worker "w$i"; then
        ports+=("$WPORT"); wpids+=("$WPID")
    fi
done
check "3 workers print the Started line after listening" eval '[[ ${#ports[@]} -eq 3 ]]'
if [[ ${#ports[@]} -ne 3 ]]; then
    echo "cannot continue without workers"
    echo "$PASSED passed, $((FAILED + 1)) failed"
    exit 1
fi
W1="127.0.0.1:${ports[0]}"; W2="127.0.0.1:${ports[1]}"; W3="127.0.0.1:${ports[2]}"
WORKERS="$W1,$W2,$W3"

expected_1000="$(printf 'worker %s host=%s partial=%s\n' \
    "$W1" "$HOST" "$(sumsq 1 334)" "$W2" "$HOST" "$(sumsq 335 667)" "$W3" "$HOST" "$(sumsq 668 1000)")
result: 333833500"

run env DISTRIBUTED_WORKERS="$WORKERS" bin/daphne --distributed "$SCRIPT" n=1000
check "distributed n=1000: per-worker lines in order and result" eval 'rc_is 0 && out_is "$expected_1000"'
check "worker logs the request" \
    eval 'grep -qE "^request from 127\.0\.0\.1: range \[1, 334\] script-hash [0-9a-f]{16}$" "$TMP/w1.log"'

ok_runs=0
for r in 1 2 3; do
    run env DISTRIBUTED_WORKERS="$WORKERS" bin/daphne --distributed --dist_backend=async-gRPC "$SCRIPT" n=1000
    rc_is 0 && out_is "$expected_1000" && ok_runs=$((ok_runs + 1))
done
check "repeated coordinator runs against the same workers" eval '[[ $ok_runs -eq 3 ]]'

cpids=()
for c in 1 2 3 4 5 6; do
    DISTRIBUTED_WORKERS="$WORKERS" timeout 60 bin/daphne --distributed "$SCRIPT" n=1000 \
        >"$TMP/conc$c.out" 2>"$TMP/conc$c.err" &
    cpids+=("$!")
done
conc_ok=0
for c in "${!cpids[@]}"; do
    if wait "${cpids[$c]}" && [[ "$(cat "$TMP/conc$((c + 1)).out")" == "$expected_1000" ]]; then
        conc_ok=$((conc_ok + 1))
    fi
done
check "6 concurrent coordinators" eval '[[ $conc_ok -eq 6 ]]'

many=""
for k in $(seq 1 16); do many+="$W1,$W2,$W3,"; done
many="${many%,}"
run env DISTRIBUTED_WORKERS="$many" bin/daphne --distributed "$SCRIPT"
check "48 workers, default n" \
    eval 'rc_is 0 && [[ $(grep -c "^worker 127.0.0.1:[0-9]* host=.* partial=[0-9]*$" "$TMP/out") -eq 48 ]] && out_has "result: 333333833333500000"'

# A large script with arbitrary bytes (all 256 byte values, 256 KiB).
big="$TMP/big script.daph"
printf "%b" "$(printf "\\\\%03o" $(seq 0 255))" >"$big"
for k in 1 2 3 4 5 6 7 8 9 10; do cat "$big" "$big" >"$big.tmp" && mv -f "$big.tmp" "$big"; done
run env DISTRIBUTED_WORKERS="$WORKERS" bin/daphne --distributed "$big" n=1000
check "256 KiB binary script" eval 'rc_is 0 && out_is "$expected_1000" && err_has "(262144 bytes"'

run env DISTRIBUTED_WORKERS="$WORKERS" bin/daphne --distributed "$SCRIPT" n=2
check "n smaller than the number of workers (empty slice)" \
    eval 'rc_is 0 && out_has "worker $W3 host=$HOST partial=0" && out_has "result: 5"'

# A port that nobody listens on: start a worker there and stop it again.
dead_port=""
if start_worker dead; then
    dead_port=$WPORT
    kill -TERM "$WPID"
    wait_exit "$WPID" 5
fi
check "SIGTERM ends a worker with exit 0" eval '[[ -n "$dead_port" && $WRC -eq 0 ]]'
check "worker prints its shutdown line" \
    eval 'grep -qF "Distributed Worker on \`127.0.0.1:$dead_port\` shutting down" "$TMP/dead.log"'
run env DISTRIBUTED_WORKERS="$W1,127.0.0.1:$dead_port,$W3" bin/daphne --distributed "$SCRIPT" n=1000
check "unreachable worker: exit 2 naming it, no result" \
    eval 'rc_is 2 && err_has "error: worker 127.0.0.1:$dead_port unreachable" && ! out_has "result:"'
run env DISTRIBUTED_WORKERS="$W1,no-such-host.invalid:1" bin/daphne --distributed "$SCRIPT" n=1000
check "unresolvable worker: exit 2 naming it" \
    eval 'rc_is 2 && err_has "error: worker no-such-host.invalid:1 unreachable"'

if start_worker sigint; then
    kill -INT "$WPID"
    wait_exit "$WPID" 5
fi
check "SIGINT ends a worker with exit 0" eval '[[ ${WRC:-1} -eq 0 ]] && grep -q "shutting down" "$TMP/sigint.log"'

usage="Usage: DistributedWorker <Address:Port> [ConfigFile]"
run bin/DistributedWorker
check "worker without args: exit 1 with usage" eval 'rc_is 1 && err_has "$usage"'
run bin/DistributedWorker 127.0.0.1:99999
check "worker with bad port: exit 1 with usage" eval 'rc_is 1 && err_has "$usage"'
run bin/DistributedWorker 127.0.0.1
check "worker without port: exit 1 with usage" eval 'rc_is 1 && err_has "$usage"'
run bin/DistributedWorker 127.0.0.1:1 a b
check "worker with 3 args: exit 1 with usage" eval 'rc_is 1 && err_has "$usage"'
run bin/DistributedWorker "$W1"
check "worker on a port in use: exit 1 naming the address" \
    eval 'rc_is 1 && err_has "$W1" && ! out_has "Started"'
run bin/DistributedWorker no-such-host.invalid:1234
check "worker on an unresolvable address: exit 1 naming it" \
    eval 'rc_is 1 && err_has "no-such-host.invalid:1234"'
run bin/DistributedWorker 127.0.0.1:1234 "$TMP/no-such-config.json"
check "worker with unreadable config file: exit 1" eval 'rc_is 1 && err_has "no-such-config.json"'

echo "== DAPHNE_ARGV_DUMP"
hostile='x=a b  '"'"'single'"'"' "double" $(touch '"$TMP"'/pwned) `id` ; | & * ? \ $HOME
second line'
utf8='π=ü'
DAPHNE_ARGV_DUMP="$TMP/argv.%p.bin" bin/daphne "$SCRIPT" n=10 "$hostile" "$utf8" \
    >"$TMP/out" 2>"$TMP/err" &
cpid=$!
wait "$cpid"
RC=$?
printf '%s\0' bin/daphne "$SCRIPT" n=10 "$hostile" "$utf8" >"$TMP/argv.expected"
check "coordinator accepts hostile script args" eval 'rc_is 0 && out_is "result: 385"'
check "coordinator argv dump is byte-identical (%p = pid)" \
    eval 'cmp -s "$TMP/argv.expected" "$TMP/argv.$cpid.bin"'
check "no shell expansion happened" eval '[[ ! -e "$TMP/pwned" ]]'

cfg="$TMP/cfg $(printf 'dir\nwith newline') \$(id) 'q' \"dq\" π-ü.json"
printf '{}\n' >"$cfg"
if DAPHNE_ARGV_DUMP="$TMP/wargv.%p.bin" start_worker argvworker "$cfg"; then
    printf '%s\0' bin/DistributedWorker "127.0.0.1:$WPORT" "$cfg" >"$TMP/wargv.expected"
    check "worker argv dump is byte-identical (hostile config path)" \
        eval 'cmp -s "$TMP/wargv.expected" "$TMP/wargv.$WPID.bin"'
    kill -TERM "$WPID"; wait_exit "$WPID" 5
else
    fail "worker with hostile config path starts"
fi

run env DISTRIBUTED_WORKERS="$WORKERS" bin/daphne --distributed "$SCRIPT" n=1000
check "workers still serve after all of the above" eval 'rc_is 0 && out_is "$expected_1000"'

for i in 0 1 2; do kill -TERM "${wpids[$i]}"; done
term_ok=0
for i in 0 1 2; do
    wait_exit "${wpids[$i]}" 5
    [[ $WRC -eq 0 ]] && term_ok=$((term_ok + 1))
done
check "all workers exit 0 on SIGTERM" eval '[[ $term_ok -eq 3 ]]'

echo
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
