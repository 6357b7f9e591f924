#!/bin/sh
# Install qpack (editable) and its dependencies, then run with the interpreter installed into:
#   sh tools/setup.sh              the library, the `qpack` command and the optional ISA-L speedup
#   sh tools/setup.sh demo [ARGS]  that, then `python -m qpack demo ARGS`
#   sh tools/setup.sh test [ARGS]  plus the test tools, then `python -m pytest -q ARGS`
#   sh tools/setup.sh which        print the interpreter it installs into; installs nothing
# The interpreter: $PYTHON (default python3) when it runs in a virtual environment; else the
# repository's .venv, made from $PYTHON, when .venv exists, QPACK_VENV=1, or $PYTHON is
# externally managed (PEP 668: an EXTERNALLY-MANAGED file, pip refuses to install into it);
# else $PYTHON itself.
set -e
cd "$(dirname "$0")/.."
case "${1:-}" in
    "" | demo | test | which) ;;
    *) echo "usage: sh tools/setup.sh [demo|test [ARGS...]|which]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
# pip's own PEP 668 test: the marker counts only outside a virtual environment
state=$("$PY" -c '
import os, sys, sysconfig
if sys.prefix != sys.base_prefix: print("venv")
elif os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")): print("managed")
else: print("plain")') || { echo "setup.sh: cannot run $PY (Python >= 3.10 is needed)" >&2; exit 1; }
if [ "$state" != venv ] && { [ -e .venv ] || [ "${QPACK_VENV:-0}" = 1 ] || [ "$state" = managed ]; }; then
    if [ "${1:-}" = which ]; then echo "$PWD/.venv/bin/python"; exit 0; fi
    if [ ! -x .venv/bin/python ]; then
        if ! "$PY" -c "import venv, ensurepip" 2>/dev/null; then
            echo "setup.sh: $PY cannot make the virtual environment .venv; install its" \
                "venv module (Debian/Ubuntu: sudo apt install python3-venv) and rerun" >&2
            exit 1
        fi
        echo "setup.sh: making .venv from $PY" >&2
        # a half-made .venv would be reused next time: remove it
        "$PY" -m venv .venv || { rm -rf .venv; exit 1; }
    fi
    PY="$PWD/.venv/bin/python"
fi
if [ "${1:-}" = which ]; then exec "$PY" -c "import sys; print(sys.executable)"; fi
# torch first, so that `torch>=2.1` below is already met and pip never resolves it from PyPI,
# whose Linux torch is a multi-gigabyte CUDA build: the pinned CPU build (+cpu) where the
# configured index or wheel folder has it, else the newest from PyTorch's CPU-only index.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0+cpu 2>/dev/null || {
        echo "setup.sh: no torch 2.13.0+cpu here; installing torch from" \
            "https://download.pytorch.org/whl/cpu" >&2
        "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
    }
fi
if [ "${1:-}" = test ]; then
    "$PY" -m pip install --quiet -e ".[test]"
else
    "$PY" -m pip install --quiet -e ".[fast]"
fi
echo "setup.sh: qpack is installed for $PY" >&2
case "${1:-}" in
    demo) shift; exec "$PY" -m qpack demo "$@" ;;
    test) shift; exec "$PY" -m pytest -q "$@" ;;
esac
