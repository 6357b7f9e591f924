#!/bin/sh
# The GPU checks of qpack, as one call on a machine with a CUDA device (the project's
# lent GPU machine, or any other): build the kernels, run the tests that take the
# device, then `tools/bench.py --device cuda` and `tools/bench_scale.py`. Logs and the
# bench JSON go to $OUT.
#
#   OUT=/tmp/qpack-gpu sh tools/device_check.sh
#
# Wheels in $WHEELS (default .whl/; for a machine that cannot reach PyPI) are installed to
# /tmp/site first.
set -u
OUT=${OUT:-/tmp/qpack-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "-")'
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || echo "kernel build failed: see build.log"
python3 -m qpack --version
# pytest-xdist, where present, spreads the tests over the machine's cores
XDIST=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")

echo "== device tests"
python3 -m pytest -q -p no:cacheprovider $XDIST -rA tests/test_device.py tests/test_bench.py \
    -k "not quick_run" >"$OUT/device-tests.log" 2>&1
tail -n 3 "$OUT/device-tests.log"
echo "cuda cases passed: $(grep -c '^PASSED.*cuda' "$OUT/device-tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/device-tests.log" | head -n 20

echo "== bench"
python3 tools/bench.py --device cuda --no-fresh --markdown --json "$OUT/bench.json" \
    >"$OUT/bench.md" 2>"$OUT/bench.err"
echo "bench rc $?"
grep -E "cuda|CHECK|total" "$OUT/bench.md"

echo "== scale"
python3 tools/bench_scale.py --device cuda 2>"$OUT/scale.err" | tee "$OUT/scale.txt"

echo "== whole suite (capped at ${SUITE_S:-150} s)"
timeout "${SUITE_S:-150}" python3 -m pytest -q -p no:cacheprovider $XDIST 2>&1 \
    | tee "$OUT/suite.log" | tail -n 8
