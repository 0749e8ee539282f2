#!/usr/bin/env bash
# Build the emulated aarch64 board that `dccl hil run --target emulated-aarch64` runs on:
#
#   .cache/aarch64/sysroot/            Debian bookworm arm64 userland: python3.11 + the libraries that
#                                      numpy / onnxruntime / ssl / sqlite need (dpkg -x, no arm64 code runs)
#   .cache/aarch64/sysroot/proc/cpuinfo  an ARM-format cpuinfo: qemu's -L prefix also covers /proc, and
#                                      onnxruntime segfaults under qemu 7.2 parsing the host's x86 one
#   .cache/aarch64/site/               aarch64 wheels (plain onnxruntime, numpy, paho-mqtt) installed with
#                                      pip --target; no torch, no compiler
#   .cache/aarch64/wheels/             the downloaded wheels (reused by `dccl deploy bundle` as a wheelhouse)
#
# Run as:  qemu-aarch64-static -L .cache/aarch64/sysroot .cache/aarch64/sysroot/usr/bin/python3.11
# with PYTHONPATH=.cache/aarch64/site:<repo>. Needs qemu-user-static (apt-get install qemu-user-static),
# network access to deb.debian.org and PyPI the first time; afterwards every step is skipped (~200 MB).
# Versions: AARCH64_PIP_PACKAGES overrides the pinned wheel set (default: the x86 edge environment's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${DCCL_AARCH64_CACHE:-$ROOT/.cache/aarch64}
SYSROOT=$OUT/sysroot
SITE=$OUT/site
WHEELS=$OUT/wheels
PACKAGES=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libssl3
          libsqlite3-0 libstdc++6 libgcc-s1 libffi8 libbz2-1.0 liblzma5)
PIP_PACKAGES=${AARCH64_PIP_PACKAGES:-"onnxruntime==1.32.0 numpy==2.4.6 paho-mqtt==2.2.0"}
PLATFORMS=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64
           --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311)
PIP=${PIP:-$ROOT/.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"

log() { printf '[aarch64] %s\n' "$*" >&2; }
command -v qemu-aarch64-static >/dev/null || { log "needs qemu-user-static (apt-get install qemu-user-static)"; exit 1; }

stamp="$(printf '%s\n' "${PACKAGES[*]}" "$PIP_PACKAGES" | sha256sum | cut -c1-16)"
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$stamp" ]; then
  log "up to date: $OUT"; exit 0
fi
mkdir -p "$OUT"

# 1. sysroot: arm64 .debs fetched with a private apt state (the host's apt config is not touched)
if [ ! -x "$SYSROOT/usr/bin/python3.11" ] || [ ! -f "$OUT/.debs-$stamp" ]; then
  log "downloading arm64 packages: ${PACKAGES[*]}"
  apt_dir=$OUT/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
  APT=(-o APT::Architecture=arm64 -o APT::Architectures=arm64 -o Dir::State::Lists="$apt_dir/lists"
       -o Dir::Cache="$apt_dir/cache" -o Dir::State::Status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${APT[@]}" update -qq
  (cd "$apt_dir/debs" && apt-get "${APT[@]}" download "${PACKAGES[@]/%/:arm64}" >/dev/null)
  rm -rf "$SYSROOT.tmp" && mkdir -p "$SYSROOT.tmp"
  for deb in "$apt_dir"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT.tmp"; done
  rm -rf "$SYSROOT" && mv "$SYSROOT.tmp" "$SYSROOT"
  touch "$OUT/.debs-$stamp"
fi

# 2. the ARM cpuinfo (Cortex-A72 = Raspberry Pi 4) that onnxruntime reads through qemu's -L prefix
mkdir -p "$SYSROOT/proc"
{
  for cpu in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
  done
} > "$SYSROOT/proc/cpuinfo"

# 3. aarch64 wheels -> site-packages (no dependency resolution: the set above is complete for the agent)
log "downloading aarch64 wheels: $PIP_PACKAGES"
mkdir -p "$WHEELS"
# shellcheck disable=SC2086  # PIP may be "python3 -m pip"; PIP_PACKAGES is a word list on purpose
$PIP download -q --disable-pip-version-check --only-binary=:all: --no-deps "${PLATFORMS[@]}" -d "$WHEELS" $PIP_PACKAGES
rm -rf "$SITE.tmp"
# shellcheck disable=SC2086
$PIP install -q --disable-pip-version-check --no-deps --no-index --find-links "$WHEELS" "${PLATFORMS[@]}" \
  --target "$SITE.tmp" $PIP_PACKAGES
rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"

# 4. bytecode compiled by the host's Python 3.11 (same magic number): emulated compilation is slow, and
#    without __pycache__ in the sysroot qemu's -L lookup would fall through to the host's /usr/lib caches
python3.11 -m compileall -q -j 2 -s "$SYSROOT" -p / "$SYSROOT/usr/lib/python3.11" >/dev/null || true
python3.11 -m compileall -q -j 2 "$SITE" >/dev/null || true

# 5. smoke test: the emulated interpreter imports numpy and onnxruntime and says aarch64
PYTHONPATH=$SITE qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
  'import platform, numpy, onnxruntime; print(platform.machine(), numpy.__version__, onnxruntime.__version__)' >&2
echo "$stamp" > "$OUT/.stamp"
log "ready: $OUT"
