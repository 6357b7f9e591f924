"""Fuzz the qpack decoder: any exception other than QpackError, any input slower than 1 s,
or any decoded output larger than the file can justify is a finding.

    python tools/fuzz.py --seconds 60                 # both modes, atheris if installed
    python tools/fuzz.py --seconds 3600 --mode structure --engine atheris
    python tools/fuzz.py --runs 1000000 --engine random

Seeds are every file in spec/vectors/. Two mutation modes:
- ``bytes``: libFuzzer's (or random) byte-level mutations of whole files;
- ``structure``: parse a seed's header, change values (huge or negative shapes and offsets,
  NaN/inf scales, wrong msgpack types, deep nesting, long strings, duplicate names, bits 0
  or 9, counts that disagree...), and re-frame it with a valid header CRC (and, sometimes,
  recomputed tensor CRCs) so the mutation reaches the checks behind the checksums.
Findings are written to --findings (default runs/fuzz-findings/) as files to turn into
regression vectors in tools/make_vectors.py.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qpack  # noqa: E402
from qpack.container import TENSOR_KEYS, frame_file, split_file  # noqa: E402

SLOW_SECONDS = 1.0
# Spec section 7: a huffman tensor decodes to at most 256x its bytes (8 codes per bit).
MAX_EXPANSION = 256


class Finding(Exception):
    """A bug: the decoder misbehaved on this input."""


def check(data: bytes) -> None:
    """Decode ``data``; raise Finding unless it decodes or fails with a QpackError, fast."""
    started = time.perf_counter()
    try:
        arrays = qpack.decode(data)
    except qpack.QpackError:
        arrays = {}
    except Exception as exc:  # the bug this harness looks for
        raise Finding(f"{type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - started
    if elapsed > SLOW_SECONDS:
        raise Finding(f"slow input: {elapsed:.2f} s for {len(data)} bytes")
    produced = sum(a.nbytes for a in arrays.values())
    if produced > MAX_EXPANSION * len(data):
        raise Finding(f"decoded {produced} bytes from a {len(data)}-byte file")


# --------------------------------------------------------------------------- mutations


def _split(blob: bytes) -> tuple[dict, bytearray] | None:
    """(header map, data section) of a file whose header decodes to a map, else None."""
    try:
        header, data, _ = split_file(blob)
    except qpack.QpackError:
        return None
    return (header, bytearray(data)) if isinstance(header, dict) else None


def _nasty_value(rng: random.Random):
    choices = [
        0,
        -1,
        1,
        7,
        9,
        2**31,
        2**32,
        2**48,
        2**48 + 1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        True,
        False,
        None,
        1.5,
        float("nan"),
        float("inf"),
        -0.0,
        "",
        "x" * rng.choice([1, 4097, 100_000]),
        "float32",
        "packed",
        "raw",
        "channel",
        b"",
        b"\x00" * rng.choice([1, 3, 4, 8, 64]),
        struct.pack("<f", float("nan")) * 4,
        [],
        [0],
        [2**48, 2**48],
        [-1],
        [1] * 17,
        ["a"],
        [[1]],
        {},
        {"k": 1},
        {1: 2},
    ]
    return rng.choice(choices)


_TENSOR_KEYS = list(TENSOR_KEYS)


def _deep(depth: int) -> bytes:
    """msgpack bytes of arrays nested ``depth`` deep (built by hand: packb refuses)."""
    return b"\x91" * depth + b"\x00"


def mutate_structure(blob: bytes, rng: random.Random) -> bytes:
    """One structure-aware mutation, re-framed with a valid header CRC."""
    parts = _split(blob)
    if parts is None:
        return blob
    header, data = parts
    tensors = header.get("tensors") if isinstance(header.get("tensors"), list) else []
    roll = rng.random()
    if tensors and roll < 0.55:
        t = rng.choice(tensors)
        if isinstance(t, dict):
            key = rng.choice(_TENSOR_KEYS)
            action = rng.random()
            if action < 0.7:
                t[key] = _nasty_value(rng)
            elif action < 0.8:
                t.pop(key, None)
            elif action < 0.9 and len(tensors) > 1:
                other = rng.choice(tensors)  # duplicate names (or a name of another type)
                t["name"] = other.get("name") if isinstance(other, dict) else other
            else:
                t["shape"] = [rng.choice([0, 1, 3, 2**20, 2**40]) for _ in range(rng.randint(0, 5))]
    elif roll < 0.65:
        header["data_size"] = (
            _nasty_value(rng) if rng.random() < 0.5 else len(data) + rng.randint(-70, 70)
        )
    elif roll < 0.72 and tensors:
        op = rng.random()
        if op < 0.4:
            pick = rng.choice(tensors)
            tensors.append(dict(pick) if isinstance(pick, dict) else pick)
        elif op < 0.8:
            tensors.pop(rng.randrange(len(tensors)))
        else:
            rng.shuffle(tensors)
    elif roll < 0.78:
        header["metadata"] = _nasty_value(rng)
    elif roll < 0.82:
        body = _deep(rng.choice([100, 1000, 100_000]))
        return frame_file(body, data, _version(rng))
    elif roll < 0.9 and data:
        # change data bytes and, half the time, fix that tensor's CRC so decoding goes on
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        if tensors and rng.random() < 0.5:
            for t in tensors:
                if isinstance(t, dict) and _covers(t, pos):
                    t["crc32"] = zlib.crc32(data[t["offset"] : t["offset"] + t["length"]])
    else:
        header[rng.choice(["tensors", "data_size", "x"])] = _nasty_value(rng)
    try:
        return frame_file(header, data, _version(rng))
    except Exception:  # a value msgpack cannot pack
        return blob


def _covers(t: dict, pos: int) -> bool:
    off, length = t.get("offset"), t.get("length")
    return type(off) is int and type(length) is int and off <= pos < off + length


def _version(rng: random.Random) -> tuple[int, int]:
    """Mostly 1.0; sometimes another, unsupported major included."""
    return (1, 0) if rng.random() < 0.9 else (rng.choice([0, 1, 2]), rng.randrange(3))


def mutate_bytes(blob: bytes, rng: random.Random) -> bytes:
    """A random byte-level mutation (the engine when atheris is not installed)."""
    buf = bytearray(blob)
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        op = rng.random()
        if op < 0.5 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.65 and buf:
            buf[rng.randrange(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op < 0.8:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op < 0.9:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif buf:
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 16)]
    return bytes(buf)


# --------------------------------------------------------------------------- engines


def seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "spec" / "vectors").rglob("*.qpk"))]


def run_random(mode: str, seconds: float, runs: int, seed: int, findings: Path) -> int:
    rng = random.Random(seed)
    corpus = seeds()
    deadline = time.monotonic() + seconds
    execs = found = 0
    while execs < runs and time.monotonic() < deadline:
        blob = rng.choice(corpus)
        for _ in range(rng.randint(1, 3)):
            use_structure = mode == "structure" or (mode == "both" and rng.random() < 0.5)
            blob = mutate_structure(blob, rng) if use_structure else mutate_bytes(blob, rng)
        execs += 1
        try:
            check(blob)
        except Finding as exc:
            found += 1
            _save(findings, blob, exc)
    print(f"random engine: {execs} executions, {found} findings, mode {mode}")
    return 1 if found else 0


def _save(findings: Path, blob: bytes, exc: Exception) -> None:
    findings.mkdir(parents=True, exist_ok=True)
    name = f"finding-{zlib.crc32(blob):08x}.qpk"
    (findings / name).write_bytes(blob)
    print(f"FINDING {name}: {exc}", file=sys.stderr)


def run_atheris(mode: str, seconds: float, runs: int, seed: int, findings: Path) -> int:
    import atheris

    corpus_dir = ROOT / "runs" / "fuzz-corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for blob in seeds():
        (corpus_dir / f"seed-{zlib.crc32(blob):08x}.qpk").write_bytes(blob)

    def test_one_input(data: bytes) -> None:
        try:
            check(data)
        except Finding:
            _save(findings, data, sys.exc_info()[1])
            raise

    def custom_mutator(data: bytes, max_size: int, mseed: int) -> bytes:
        rng = random.Random(mseed)
        if mode == "structure" or (mode == "both" and rng.random() < 0.5):
            out = mutate_structure(data, rng)
            if out != data and len(out) <= max_size:
                return out
        return atheris.Mutate(data, max_size)

    argv = [
        sys.argv[0],
        str(corpus_dir),
        f"-seed={seed}",
        "-max_len=65536",
        "-rss_limit_mb=2048",
        f"-timeout={int(SLOW_SECONDS * 5)}",
        "-print_final_stats=1",
    ]
    if seconds:
        argv.append(f"-max_total_time={int(seconds)}")
    if runs:
        argv.append(f"-runs={runs}")
    atheris.instrument_all()  # coverage feedback from qpack (and msgpack's Python layer)
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the qpack decoder.")
    parser.add_argument("--mode", choices=["bytes", "structure", "both"], default="both")
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (0: none)")
    parser.add_argument("--runs", type=int, default=0, help="execution budget (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--findings", type=Path, default=ROOT / "runs" / "fuzz-findings")
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    runs = args.runs or (1 << 62)
    seconds = args.seconds or float("inf")
    if engine == "atheris":
        return run_atheris(args.mode, args.seconds, args.runs, args.seed, args.findings)
    return run_random(args.mode, seconds, runs, args.seed, args.findings)


if __name__ == "__main__":
    raise SystemExit(main())
