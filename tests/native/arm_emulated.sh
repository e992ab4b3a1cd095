#!/usr/bin/env bash
# The package's native tests on 64-bit Arm, emulated on an x86 Debian machine (root): an arm64
# Debian root (debootstrap's first stage, its packages unpacked, nothing configured), Python
# packages for aarch64 from PyPI, the extension cross-compiled, and pytest run by
# qemu-aarch64. Slow (the pip step ~8 min, the tests ~an hour on 2 cores); not part of
# `make test`, whose Arm check is tests/native/kernel_paths.cpp. docs/runtime.md has a run.
#
#   tests/native/arm_emulated.sh [pytest arguments]   (default: the native kernel tests)
set -euo pipefail
ROOT=${ARM_ROOT:-/opt/arm64}              # the arm64 Debian root
SITE=${ARM_SITE:-/opt/arm64py}            # its Python packages (pip --target)
REPO=${ARM_REPO:-/tmp/specserve-arm}      # a copy of this checkout with the Arm build
cd "$(dirname "$0")/../.."

apt-get install -y -q --no-install-recommends debootstrap qemu-user g++-aarch64-linux-gnu >/dev/null
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3.11,libpython3.11-dev,python3-pip bookworm "$ROOT" http://deb.debian.org/debian
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi
python=(qemu-aarch64 -L "$ROOT" "$ROOT/usr/bin/python3.11")
if [ ! -d "$SITE/torch" ]; then
  # torch 2.9.1: PyPI's newer aarch64 wheels are CUDA builds of several GB.
  "${python[@]}" -m pip install -q --target "$SITE" torch==2.9.1 "gguf>=0.17,<1" \
    "tokenizers>=0.21,<1" "safetensors>=0.4,<1" jinja2 numpy tqdm fastapi uvicorn \
    prometheus-client platformdirs "llguidance>=1.9,<2" pytest
fi
rm -rf "$REPO" && mkdir -p "$REPO"
git ls-files -z | xargs -0 cp --parents -t "$REPO"
# the tests read ../shared/data beside the checkout (tests/paths.py)
if [ -d ../shared ]; then ln -sfn "$(cd ../shared && pwd)" "$(dirname "$REPO")/shared"; fi
aarch64-linux-gnu-g++ -O3 -std=c++17 -ffp-contract=off -fno-trapping-math -fPIC -shared \
  -DNDEBUG -I"$ROOT/usr/include/python3.11" -I"$ROOT/usr/include" \
  specserve/model/native/qmatmul.cpp specserve/model/native/layer.cpp \
  -o "$REPO/specserve/model/_native.cpython-311-aarch64-linux-gnu.so"
cd "$REPO"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/unit/test_native_kernels.py tests/unit/test_kv_cache.py)
PYTHONPATH="$SITE:$REPO" "${python[@]}" -m pytest -q -p no:cacheprovider "${tests[@]}"
