#!/usr/bin/env bash
# build.sh - build the DAPHNE stand-in (mirrors the flags of upstream DAPHNE's build.sh).
#
# Outputs (relative to this directory):
#   lib/libdaphnekernels.so     shared "kernels" library, used by both binaries
#   bin/daphne                  coordinator        (--target daphne, the default)
#   bin/DistributedWorker       distributed worker (--target DistributedWorker)
#   bin/git_source_status_info  `git rev-parse HEAD` + `git status --porcelain`, or "unknown"
# Intermediates go to build/.  Binaries find the library through RPATH
# $ORIGIN/../lib, so the bin/ + lib/ tree can be packed and unpacked elsewhere.
#
# Only needs bash, coreutils and a C++17 compiler (${CXX:-c++}, else g++);
# git is optional.  Objects are rebuilt only when out of date.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

usage() {
    cat <<'EOF'
Usage: ./build.sh [options]

Build the DAPHNE stand-in.

Options:
  --target TARGET      daphne (default) or DistributedWorker
  --clean              remove build/, bin/ and lib/ and exit
  --debug              build with -O0 -g instead of -O2
  --installPrefix P    accepted and recorded in the build log (no other effect)
  -nd, --no-deps       accepted (dependencies are prebuilt; no effect)
  -nf, --no-fancy      accepted (output is always plain)
  -y                   accepted (never asks anything)
  --mpi, --cuda        accepted (the stand-in has no MPI/CUDA support)
  -h, --help           print this help and exit

Environment:
  CXX                  C++ compiler (default: c++, falling back to g++)
EOF
}

target="daphne"
debug=0
install_prefix=""
accepted=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --target)
            if [[ $# -lt 2 ]]; then
                echo "error: --target needs a value" >&2; usage >&2; exit 1
            fi
            target="$2"; shift ;;
        --target=*) target="${1#--target=}" ;;
        --installPrefix)
            if [[ $# -lt 2 ]]; then
                echo "error: --installPrefix needs a value" >&2; usage >&2; exit 1
            fi
            install_prefix="$2"; shift ;;
        --installPrefix=*) install_prefix="${1#--installPrefix=}" ;;
        --clean)
            echo "Removing build/, bin/ and lib/"
            rm -rf build bin lib
            exit 0 ;;
        --debug) debug=1; accepted+=("$1") ;;
        -nd|--no-deps|-nf|--no-fancy|-y|--mpi|--cuda) accepted+=("$1") ;;
        *)
            echo "error: unknown option '$1'" >&2; usage >&2; exit 1 ;;
    esac
    shift
done

case "$target" in
    daphne) main_src="daphne_main" ;;
    DistributedWorker) main_src="worker_main" ;;
    *) echo "error: unknown target '$target' (expected daphne or DistributedWorker)" >&2; usage >&2; exit 1 ;;
esac

# ---------------------------------------------------------------- compiler --
if [[ -n "${CXX:-}" ]]; then
    cxx="$CXX"
elif command -v c++ >/dev/null 2>&1; then
    cxx="c++"
elif command -v g++ >/dev/null 2>&1; then
    cxx="g++"
else
    echo "error: no C++ compiler found (set CXX, or install g++)" >&2
    exit 1
fi

if [[ $debug -eq 1 ]]; then opt=(-O0 -g); else opt=(-O2); fi
cxxflags=(-std=c++17 "${opt[@]}" -Wall -Wextra -pthread -fPIC)

echo "Building target '$target' with $cxx ${cxxflags[*]}"
if [[ ${#accepted[@]} -gt 0 ]]; then echo "Accepted flags: ${accepted[*]}"; fi
if [[ -n "$install_prefix" ]]; then
    echo "Install prefix: $install_prefix (recorded only; the stand-in installs nothing)"
fi

mkdir -p build bin lib

# Changing the compiler or flags invalidates every object.
flags_sig="$cxx ${cxxflags[*]}"
if [[ ! -f build/.flags ]] || [[ "$(cat build/.flags)" != "$flags_sig" ]]; then
    rm -f build/*.o
    printf '%s\n' "$flags_sig" > build/.flags
fi

# ------------------------------------------------------------------ compile --
# An object is out of date when missing, or older than its source, any header
# in src/ (headers are few and shared), or this script.
needs_rebuild() { # out inputs...
    local out="$1"; shift
    [[ -e "$out" ]] || return 0
    local f
    for f in "$@"; do
        [[ "$f" -nt "$out" ]] && return 0
    done
    return 1
}

headers=(src/*.h)
objects=(kernels net util "$main_src")
pids=()
names=()
step=0
for obj in "${objects[@]}"; do
    step=$((step + 1))
    if needs_rebuild "build/$obj.o" "src/$obj.cpp" "${headers[@]}" build.sh; then
        echo "[$step/${#objects[@]}] Compiling src/$obj.cpp -> build/$obj.o"
        # Compile in the background (parallel), into a temporary file that is
        # renamed only on success so a failed compile never looks up to date.
        ( "$cxx" "${cxxflags[@]}" -c "src/$obj.cpp" -o "build/$obj.o.tmp" \
              > "build/$obj.log" 2>&1 \
          && mv -f "build/$obj.o.tmp" "build/$obj.o" ) &
        pids+=("$!")
        names+=("$obj")
    else
        echo "[$step/${#objects[@]}] Up to date: build/$obj.o"
    fi
done

failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        failed=1
        echo "error: compiling src/${names[$i]}.cpp failed:" >&2
    fi
    if [[ -s "build/${names[$i]}.log" ]]; then cat "build/${names[$i]}.log" >&2; fi
done
if [[ $failed -ne 0 ]]; then
    rm -f build/*.o.tmp
    echo "Build FAILED: bin/$target" >&2
    exit 1
fi

# --------------------------------------------------------------------- link --
# Link into a temporary name and rename, so running binaries are never
# overwritten in place ("text file busy") and a failed link leaves no junk.
lib=lib/libdaphnekernels.so
if needs_rebuild "$lib" build/kernels.o; then
    echo "Linking $lib"
    "$cxx" "${cxxflags[@]}" -shared -Wl,-soname,libdaphnekernels.so \
        build/kernels.o -o "$lib.tmp"
    mv -f "$lib.tmp" "$lib"
else
    echo "Up to date: $lib"
fi

bin="bin/$target"
if needs_rebuild "$bin" build/net.o build/util.o "build/$main_src.o" "$lib"; then
    echo "Linking $bin"
    # shellcheck disable=SC2016  # $ORIGIN is for the dynamic loader, not the shell
    "$cxx" "${cxxflags[@]}" build/"$main_src".o build/net.o build/util.o \
        -Llib -ldaphnekernels -Wl,-rpath,'$ORIGIN/../lib' -o "$bin.tmp"
    mv -f "$bin.tmp" "$bin"
else
    echo "Up to date: $bin"
fi

# ------------------------------------------------------------ source status --
# Never fails: no git, not a repository, or a repository owned by another user
# (e.g. inside a container) all end up as "unknown" or as git's answer.
status_file=bin/git_source_status_info
{
    if command -v git >/dev/null 2>&1 \
        && head=$(git -c safe.directory='*' rev-parse HEAD 2>/dev/null); then
        printf '%s\n' "$head"
        git -c safe.directory='*' status --porcelain -- . 2>/dev/null || true
    else
        echo "unknown"
    fi
} > "$status_file.tmp" || echo "unknown" > "$status_file.tmp"
mv -f "$status_file.tmp" "$status_file"

echo "Build succeeded: bin/$target"
