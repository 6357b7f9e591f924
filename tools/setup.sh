#!/bin/sh
# Install qpack (editable) and its dependencies into the current Python 3.
#   sh tools/setup.sh         the library, the `qpack` command and the optional ISA-L speedup
#   sh tools/setup.sh test    plus the test tools (pytest, hypothesis, ruff, gguf for bench)
# torch is installed first, pinned to the CPU build that this machine keeps on disk, so that
# resolving `torch>=2.1` never downloads a multi-gigabyte CUDA build.
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
if [ "${1:-}" = "test" ]; then
    "$PY" -m pip install --quiet -e ".[test]"
else
    "$PY" -m pip install --quiet -e ".[fast]"
fi
