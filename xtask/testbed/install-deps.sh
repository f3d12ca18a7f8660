#!/bin/bash
# install-deps.sh - install what the SLURM/Apptainer testbed needs on Debian 12 (bookworm).
#
# Idempotent: installs only what is missing, runs `apt-get update` only when a package is missing.
# Must run as root. Takes no arguments.
#   TB_SKIP_APPTAINER=1   skip Apptainer (and its capability workaround)
#
# Apptainer: Debian 12 has no package. We take Debian sid's apptainer .deb (fetched by URL, SHA256
# checked against sid's Packages.xz index) and give it a PRIVATE newer glibc in /opt/glibc-sid via
# patchelf. sid is never added to the apt sources (that would upgrade the system's glibc).
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 0 ] || die "takes no arguments (env: TB_SKIP_APPTAINER=1 skips Apptainer)"
[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"
if [ ! -r /etc/debian_version ] || ! command -v dpkg-query >/dev/null; then die "needs a Debian 12 (bookworm) system"; fi
# shellcheck disable=SC1091
VERSION_ID=$(. /etc/os-release 2>/dev/null && echo "${VERSION_ID:-}")
[ "$VERSION_ID" = 12 ] || log "WARNING: made for Debian 12 (bookworm), this is Debian '${VERSION_ID:-unknown}'"

T0=$(date +%s%N)
export DEBIAN_FRONTEND=noninteractive
DONE=()                                  # human-readable summary of what this run changed
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)

SYS_PKGS=(slurm-wlm slurmctld slurmd slurm-client munge openssh-server openssh-client
          iproute2 rsync procps util-linux)
APPT_PKGS=(squashfs-tools squashfuse uidmap patchelf debootstrap ca-certificates libseccomp2
           libsqlite3-0 wget xz-utils e2fsprogs)

SID=http://deb.debian.org/debian
GLIBC_DIR=/opt/glibc-sid
APPT_BIN=/usr/bin/apptainer
APPT_LIBEXEC=/usr/lib/x86_64-linux-gnu/apptainer
APPT_CONF=/etc/apptainer/apptainer.conf

# gone PID: the process has exited (a zombie waiting for its reaper counts as gone)
gone() { [ "$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null)" = "" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
apptainer_ok() { [ -x "$APPT_BIN" ] && "$APPT_BIN" --version >/dev/null 2>&1; }

WANT=("${SYS_PKGS[@]}")
if [ "${TB_SKIP_APPTAINER:-0}" != 1 ] && ! apptainer_ok; then WANT+=("${APPT_PKGS[@]}"); fi
MISSING=()
for p in "${WANT[@]}"; do installed "$p" || MISSING+=("$p"); done

# ---------------------------------------------------------------------------------- apt packages
# Daemons whose package postinst may start them (there is no systemd here; invoke-rc.d would run the
# SysV script). A policy-rc.d that exits 101 forbids that; we also check their pidfiles afterwards.
DAEMON_PIDFILES=("/run/sshd.pid:/usr/sbin/sshd" "/run/munge/munged.pid:/usr/sbin/munged"
                 "/run/slurmctld.pid:/usr/sbin/slurmctld" "/run/slurmd.pid:/usr/sbin/slurmd"
                 "/run/slurm/slurmctld.pid:/usr/sbin/slurmctld" "/run/slurm/slurmd.pid:/usr/sbin/slurmd")
POLICY=/usr/sbin/policy-rc.d
POLICY_CREATED=0
cleanup_policy() { if [ "$POLICY_CREATED" = 1 ]; then rm -f "$POLICY"; POLICY_CREATED=0; fi; }
trap cleanup_policy EXIT

if [ ${#MISSING[@]} -gt 0 ]; then
  log "missing packages: ${MISSING[*]}"
  PRE_PIDS=()
  PRE_RUN_SSHD=0; [ -d /run/sshd ] && PRE_RUN_SSHD=1
  for e in "${DAEMON_PIDFILES[@]}"; do PRE_PIDS+=("$(cat "${e%%:*}" 2>/dev/null || true)"); done
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, created by daphne testbed install-deps.sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"; POLICY_CREATED=1
  fi
  t=$(date +%s)
  # The index may be missing (fresh machine) or stale (404 on a pool file): update first.
  apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null || die "apt-get update failed"
  apt-get install "${APT_OPTS[@]}" "${MISSING[@]}" >/tmp/install-deps-apt.$$.log 2>&1 \
    || { tail -30 /tmp/install-deps-apt.$$.log >&2; rm -f /tmp/install-deps-apt.$$.log; die "apt-get install failed"; }
  rm -f /tmp/install-deps-apt.$$.log
  cleanup_policy
  DONE+=("apt: ${MISSING[*]} ($(( $(date +%s) - t )) s)")
  # Stop exactly what the install started (a pidfile that is new and points at that daemon).
  i=0
  for e in "${DAEMON_PIDFILES[@]}"; do
    pf=${e%%:*} exe=${e#*:}
    pid=$(cat "$pf" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$pid" != "${PRE_PIDS[$i]}" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$exe")" ]; then
      log "package install started $exe (pid $pid, $pf): stopping it"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do gone "$pid" && break; sleep 0.1; done
      gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
      rm -f "$pf"
      DONE+=("stopped $exe started by its package (pid $pid)")
      # the init script also created sshd's privilege separation dir: up.sh creates it when needed
      if [ "$exe" = /usr/sbin/sshd ] && [ "$PRE_RUN_SSHD" = 0 ]; then rmdir /run/sshd 2>/dev/null || true; fi
    fi
    i=$((i + 1))
  done
else
  log "apt packages: all present"
fi
# sanity check: the programs the testbed scripts use
for b in slurmctld slurmd munged mungekey sshd ssh-keygen ip nsenter unshare rsync; do
  command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || die "$b not found after install"
done

# ---------------------------------------------------------------------------------- Apptainer
install_apptainer() {
  local tmp t fn_a sha_a fn_c sha_c
  t=$(date +%s)
  tmp=$(mktemp -d /tmp/install-deps-appt.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'; cleanup_policy" EXIT
  log "fetching Debian sid package index"
  wget -q -O "$tmp/Packages.xz" "$SID/dists/sid/main/binary-amd64/Packages.xz" || die "cannot download sid Packages.xz"
  xz -dc "$tmp/Packages.xz" > "$tmp/Packages"
  # field FIELD PACKAGE: value of FIELD in the (first) stanza of PACKAGE
  field() { awk -v RS= -v f="$1" -v p="$2" '
      { n = split($0, L, "\n"); pk = ""; v = ""
        for (i = 1; i <= n; i++) { if (L[i] == "Package: " p) pk = p; if (index(L[i], f ": ") == 1) v = substr(L[i], length(f) + 3) }
        if (pk != "" && v != "") { print v; exit } }' "$tmp/Packages"; }
  fn_a=$(field Filename apptainer); sha_a=$(field SHA256 apptainer)
  fn_c=$(field Filename libc6);     sha_c=$(field SHA256 libc6)
  if [ -z "$fn_a" ] || [ -z "$sha_a" ] || [ -z "$fn_c" ] || [ -z "$sha_c" ]; then die "apptainer/libc6 not found in the sid index"; fi
  log "downloading $fn_a and $fn_c"
  wget -q -O "$tmp/apptainer.deb" "$SID/$fn_a" || die "download of $fn_a failed"
  wget -q -O "$tmp/libc6.deb" "$SID/$fn_c" || die "download of $fn_c failed"
  echo "$sha_a  $tmp/apptainer.deb" | sha256sum -c --quiet - || die "SHA256 mismatch for $fn_a"
  echo "$sha_c  $tmp/libc6.deb" | sha256sum -c --quiet - || die "SHA256 mismatch for $fn_c"
  # private glibc: never on the system library path
  dpkg -x "$tmp/libc6.deb" "$tmp/libc6"
  mkdir -p "$GLIBC_DIR"
  cp -a "$tmp/libc6/usr/lib/x86_64-linux-gnu/." "$GLIBC_DIR/"
  [ -e "$GLIBC_DIR/ld-linux-x86-64.so.2" ] || die "no ld-linux-x86-64.so.2 in $fn_c"
  # Keep a locally edited apptainer.conf (e.g. our capability setting) over a re-extraction.
  [ -f "$APPT_CONF" ] && cp -a "$APPT_CONF" "$tmp/apptainer.conf.keep"
  dpkg -x "$tmp/apptainer.deb" /
  [ -f "$tmp/apptainer.conf.keep" ] && cp -a "$tmp/apptainer.conf.keep" "$APPT_CONF"
  local f
  for f in "$APPT_BIN" "$APPT_LIBEXEC/bin/starter"; do
    patchelf --set-interpreter "$GLIBC_DIR/ld-linux-x86-64.so.2" --force-rpath \
      --set-rpath "$GLIBC_DIR:/usr/lib/x86_64-linux-gnu" "$f"
  done
  apptainer_ok || die "apptainer --version fails after install"
  rm -rf "$tmp"
  trap cleanup_policy EXIT
  DONE+=("apptainer $("$APPT_BIN" --version | awk '{print $NF}') from $fn_a with private glibc $fn_c in $GLIBC_DIR ($(( $(date +%s) - t )) s)")
}

# subordinate ids for --fakeroot
ensure_subids() {
  local f
  for f in /etc/subuid /etc/subgid; do
    if ! grep -q '^root:' "$f" 2>/dev/null; then
      echo "root:100000:65536" >> "$f"; DONE+=("added root:100000:65536 to $f")
    fi
  done
}

# This sandbox's bounding set lacks CAP_SYS_RESOURCE (bit 24): Apptainer, as root, asks for the full
# set by default and fails ("Requesting capability set ... while permitted capability set is ...").
# One-time fix: root gets the capabilities from the capability file, which lists every capability of
# our bounding set. Standard machines (CAP_SYS_RESOURCE present) are left untouched.
capability_workaround() {
  local bnd caps want have
  bnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
  if (( (0x$bnd >> 24) & 1 )); then
    log "CAP_SYS_RESOURCE is in the bounding set: no capability workaround needed"
    return
  fi
  # Every capability Apptainer knows whose bit is in our bounding set.
  caps=$(capability_names | while read -r c bit; do
           if (( (0x$bnd >> bit) & 1 )); then echo "$c"; fi; done | paste -sd, -)
  [ -n "$caps" ] || die "could not compute the capability list"
  if grep -Eq '^[[:space:]]*root default capabilities[[:space:]]*=[[:space:]]*file[[:space:]]*$' "$APPT_CONF"; then
    :
  elif grep -Eq '^[[:space:]]*root default capabilities[[:space:]]*=' "$APPT_CONF"; then
    sed -i -E 's/^[[:space:]]*root default capabilities[[:space:]]*=.*/root default capabilities = file/' "$APPT_CONF"
    DONE+=("$APPT_CONF: root default capabilities = file")
  else
    echo "root default capabilities = file" >> "$APPT_CONF"
    DONE+=("$APPT_CONF: root default capabilities = file")
  fi
  have=$(apptainer capability list root 2>/dev/null | tr -s ' ,:\t\n' '\n' | grep '^CAP_' | sort -u | paste -sd, - || true)
  want=$(tr ',' '\n' <<<"$caps" | sort -u | paste -sd, -)
  if [ "$have" != "$want" ]; then
    apptainer capability add --user root "$caps" >/dev/null 2>&1 \
      || die "apptainer capability add --user root $caps failed"
    DONE+=("apptainer capability add --user root <$(tr ',' '\n' <<<"$caps" | wc -l) capabilities, all but CAP_SYS_RESOURCE>")
  fi
}

# "CAP_NAME BIT" for each capability (Linux numbering; the ones Apptainer 1.4 knows).
capability_names() {
  cat <<'EOF'
CAP_CHOWN 0
CAP_DAC_OVERRIDE 1
CAP_DAC_READ_SEARCH 2
CAP_FOWNER 3
CAP_FSETID 4
CAP_KILL 5
CAP_SETGID 6
CAP_SETUID 7
CAP_SETPCAP 8
CAP_LINUX_IMMUTABLE 9
CAP_NET_BIND_SERVICE 10
CAP_NET_BROADCAST 11
CAP_NET_ADMIN 12
CAP_NET_RAW 13
CAP_IPC_LOCK 14
CAP_IPC_OWNER 15
CAP_SYS_MODULE 16
CAP_SYS_RAWIO 17
CAP_SYS_CHROOT 18
CAP_SYS_PTRACE 19
CAP_SYS_PACCT 20
CAP_SYS_ADMIN 21
CAP_SYS_BOOT 22
CAP_SYS_NICE 23
CAP_SYS_RESOURCE 24
CAP_SYS_TIME 25
CAP_SYS_TTY_CONFIG 26
CAP_MKNOD 27
CAP_LEASE 28
CAP_AUDIT_WRITE 29
CAP_AUDIT_CONTROL 30
CAP_SETFCAP 31
CAP_MAC_OVERRIDE 32
CAP_MAC_ADMIN 33
CAP_SYSLOG 34
CAP_WAKE_ALARM 35
CAP_BLOCK_SUSPEND 36
CAP_AUDIT_READ 37
CAP_PERFMON 38
CAP_BPF 39
CAP_CHECKPOINT_RESTORE 40
EOF
}

# Check that plain `apptainer exec` (no flags) of a real SIF works as root: build a tiny SIF from a
# directory holding the host's /bin/sh and its libraries (no %post, so about a second), exec it.
check_exec() {
  local tmp out lib
  tmp=$(mktemp -d /tmp/install-deps-check.XXXXXX)
  mkdir -p "$tmp/root/bin" "$tmp/root/etc"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$tmp/root/etc/passwd"
  echo 'root:x:0:' > "$tmp/root/etc/group"
  cp -L /bin/sh "$tmp/root/bin/sh"
  for lib in $(ldd /bin/sh | grep -o '/[^ ]*'); do
    mkdir -p "$tmp/root$(dirname "$lib")"; cp -L "$lib" "$tmp/root$lib"
  done
  if ! apptainer -s build "$tmp/check.sif" "$tmp/root" >"$tmp/build.log" 2>&1; then
    cat "$tmp/build.log" >&2; rm -rf "$tmp"; die "apptainer build of a test SIF failed"
  fi
  out=$(apptainer exec "$tmp/check.sif" /bin/sh -c 'echo exec-ok' 2>"$tmp/exec.err") || true
  [ "$out" = exec-ok ] || { cat "$tmp/exec.err" >&2; rm -rf "$tmp"; die "plain 'apptainer exec IMAGE cmd' fails as root"; }
  rm -rf "$tmp"
  log "check: plain 'apptainer exec IMAGE cmd' works as root"
}

if [ "${TB_SKIP_APPTAINER:-0}" = 1 ]; then
  log "TB_SKIP_APPTAINER=1: skipping Apptainer"
else
  if apptainer_ok; then
    log "apptainer present: $("$APPT_BIN" --version)"
  else
    install_apptainer
  fi
  ensure_subids
  capability_workaround
  check_exec
fi

T1=$(date +%s%N)
log "versions: $(dpkg-query -W -f='slurm ${Version}' slurmctld), $(dpkg-query -W -f='munge ${Version}' munge), $(dpkg-query -W -f='openssh ${Version}' openssh-server)$(apptainer_ok && echo ", $("$APPT_BIN" --version)")"
if [ ${#DONE[@]} -eq 0 ]; then
  log "nothing to do, everything was already installed"
else
  log "installed/changed:"
  for d in "${DONE[@]}"; do printf '  - %s\n' "$d"; done
fi
log "$(printf 'done in %d.%02d s' $(( (T1 - T0) / 1000000000 )) $(( (T1 - T0) / 10000000 % 100 )))"
