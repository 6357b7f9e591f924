"""The ``qpack`` command line: every subcommand, and each kind of bad input.

A representative subset runs the way a user would (``python -m qpack`` in a subprocess); the
rest calls :func:`qpack.cli.main` in-process with capsys, which is much faster.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qpack
from qpack.cli import main

TIMEOUT = 120


def run_cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m qpack ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qpack", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call(capsys, *args) -> tuple[int, str, str]:
    """Run ``main(args)`` in-process; returns (status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qpack: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def assert_usage_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qpack: error: "), err
    for fragment in fragments:
        assert fragment in last, (fragment, err)


def no_leftovers(folder: Path, *allowed: str) -> None:
    """Nothing but ``allowed`` names in ``folder``: no partial outputs or temp files."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)


class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilOpen:
    """Unpickling this would create a marker file with open()."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- fixtures


def small_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=gen),
        "conv.bias": torch.randn(8, generator=gen),
        "fc.weight": torch.randn(10, 20, generator=gen),
        "fc.bias": torch.randn(10, generator=gen),
        "half.weight": torch.randn(6, 5, generator=gen).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(7),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint, its 8-bit .qpk, and assorted bad inputs (shared, read-only)."""
    d = tmp_path_factory.mktemp("inputs")
    sd = small_state_dict()
    f = {
        "ckpt": d / "model.pt",
        "qpk": d / "model.qpk",
        "list": d / "list.pt",
        "int": d / "int.pt",
        "text": d / "notes.txt",
        "notensor": d / "notensor.pt",
        "garbage": d / "garbage.qpk",
        "truncated": d / "truncated.qpk",
        "tiny": d / "tiny.qpk",
        "corrupt_data": d / "corrupt_data.qpk",
        "corrupt_header": d / "corrupt_header.qpk",
    }
    torch.save(sd, f["ckpt"])
    qpack.save(sd, f["qpk"], bits=8, uniform=True)
    torch.save([1, 2, 3], f["list"])
    torch.save(42, f["int"])
    f["text"].write_text("these are not the weights you are looking for\n")
    torch.save({"epoch": 3, "lr": 0.1}, f["notensor"])
    f["garbage"].write_bytes(b"G" + random.Random(0).randbytes(4999))
    data = f["qpk"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) - 10])
    f["tiny"].write_bytes(data[:12])
    corrupt = bytearray(data)
    corrupt[-3] ^= 0x40  # inside the last tensor's payload
    f["corrupt_data"].write_bytes(bytes(corrupt))
    corrupt = bytearray(data)
    corrupt[30] ^= 0xFF  # inside the header
    f["corrupt_header"].write_bytes(bytes(corrupt))
    return f


def numel(sd) -> int:
    return sum(t.numel() for t in sd.values())


# --------------------------------------------------------------------------- as a user runs it


def test_subprocess_version_and_help():
    res = run_cli("--version")
    assert res.returncode == 0
    from qpack import _zlib, kernels

    engines = f"kernels: {kernels.BACKEND}, crc32: {_zlib.BACKEND}"
    assert res.stdout.strip() == f"qpack {qpack.__version__} ({engines})"
    res = run_cli("--help")
    assert res.returncode == 0
    for command in ("pack", "unpack", "inspect", "verify", "demo"):
        assert command in res.stdout


def test_subprocess_pack_verify_unpack_round_trip(tmp_path, files):
    out = tmp_path / "m.qpk"
    res = run_cli("pack", files["ckpt"], "-o", out, "--bits", "4")
    assert res.returncode == 0, res.stderr
    assert "6 tensors" in res.stdout and "x smaller than float32" in res.stdout
    assert res.stdout.count("\n") == 1

    res = run_cli("verify", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"OK {out}: 6 tensors, checksums valid"

    back = tmp_path / "back.pt"
    res = run_cli("unpack", out, "-o", back)
    assert res.returncode == 0, res.stderr
    restored = torch.load(back, weights_only=True)
    expected = qpack.load(out)
    assert list(restored) == list(expected)
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor)
    no_leftovers(tmp_path, "m.qpk", "back.pt")


def test_subprocess_verify_corrupted_exits_1(files):
    res = run_cli("verify", files["corrupt_data"])
    assert res.returncode == 1
    assert res.stdout == ""
    assert_one_line_error(res.stderr, str(files["corrupt_data"]), "checksum", "tensor")


def test_subprocess_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": Evil(marker)}, evil)
    out = tmp_path / "out.qpk"
    res = run_cli("pack", evil, "-o", out)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "evil.pt", "refused")
    assert not marker.exists()
    assert not out.exists()


def test_subprocess_usage_errors_exit_2(files, tmp_path):
    res = run_cli("pack", files["ckpt"], "-o", tmp_path / "x.qpk", "--bits", "9")
    assert res.returncode == 2
    assert_usage_error(res.stderr, "--bits", "1 to 8")
    res = run_cli("pack", files["ckpt"], "-o", tmp_path / "x.qpk", "--scheme", "nope")
    assert res.returncode == 2
    assert_usage_error(res.stderr, "--scheme", "nope")
    res = run_cli("frobnicate")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    no_leftovers(tmp_path)


def test_subprocess_ctrl_c_exits_130(tmp_path):
    from qpack.demo.unet import UNet

    ckpt = tmp_path / "unet.pt"
    torch.save(UNet().state_dict(), ckpt)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpack", "demo", "--checkpoint", str(ckpt), "--samples", "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a runner started in the background may hand down SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        seen = []
        for line in proc.stderr:  # wait until the model is running
            seen.append(line)
            if line.startswith("evaluating"):
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err


# --------------------------------------------------------------------------- pack


def test_pack_summary_and_metadata(tmp_path, files, capsys):
    out = tmp_path / "m.qpk"
    status, stdout, err = call(
        capsys, "pack", files["ckpt"], "-o", out, "--metadata", "owner=me", "note=a=b"
    )
    assert status == 0, err
    size = out.stat().st_size
    params = numel(small_state_dict())
    assert f"{size:,} bytes" in stdout
    assert f"{4 * params / size:.2f}x" in stdout
    meta = qpack.inspect(out)["metadata"]
    assert meta["source"] == "model.pt"
    assert meta["owner"] == "me"
    assert meta["note"] == "a=b"


@pytest.mark.parametrize("scheme", sorted(qpack.SCHEMES))
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_pack_bits_and_scheme(tmp_path, files, capsys, bits, scheme):
    out = tmp_path / "m.qpk"
    status, _, err = call(
        capsys, "pack", files["ckpt"], "-o", out, "--bits", bits, "--scheme", scheme, "--uniform"
    )
    assert status == 0, err
    info = qpack.inspect(out)
    packed = [t for t in info["tensors"] if t["storage"] in ("packed", "huffman")]
    assert {t["name"] for t in packed} == {"conv.weight", "fc.weight", "half.weight"}
    assert all(t["bits"] == bits and t["scheme"] == scheme for t in packed)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_pack_wrapped_state_dict(tmp_path, files, capsys, key):
    sd = small_state_dict()
    ckpt = tmp_path / "wrapped.pt"
    torch.save({key: sd, "epoch": 12, "optimizer": {"lr": 0.1}}, ckpt)
    out = tmp_path / "m.qpk"
    status, _, err = call(capsys, "pack", ckpt, "-o", out)
    assert status == 0, err
    assert list(qpack.load(out)) == list(sd)
    assert qpack.inspect(out)["metadata"]["source_key"] == key


def test_round_trip_in_process(tmp_path, files, capsys):
    back = tmp_path / "back.pt"
    status, stdout, err = call(capsys, "unpack", files["qpk"], "-o", back)
    assert status == 0, err
    assert "6 tensors" in stdout
    restored = torch.load(back, weights_only=True)
    expected = qpack.load(files["qpk"])
    assert list(restored) == list(expected)
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype
        assert restored[name].shape == tensor.shape
        assert torch.equal(restored[name], tensor)
    # the float original is recovered within 8-bit quantization error
    original = small_state_dict()
    for name, tensor in original.items():
        if tensor.is_floating_point():
            step = (tensor.float().max() - tensor.float().min()) / 255
            assert (restored[name].float() - tensor.float()).abs().max() <= step
        else:
            assert torch.equal(restored[name], tensor)


@pytest.mark.parametrize(
    "which, fragment",
    [
        ("list", "holds a list"),
        ("int", "holds an int"),
        ("text", "not a PyTorch checkpoint"),
        ("notensor", "without tensors"),
        ("garbage", "not a PyTorch checkpoint"),
        ("qpk", "not a PyTorch checkpoint"),
    ],
)
def test_pack_not_a_checkpoint(tmp_path, files, capsys, which, fragment):
    out = tmp_path / "out.qpk"
    status, stdout, err = call(capsys, "pack", files[which], "-o", out)
    assert status == 1
    assert stdout == ""
    assert_one_line_error(err, str(files[which]), fragment)
    no_leftovers(tmp_path)


def test_pack_missing_file_and_directory(tmp_path, capsys):
    status, _, err = call(capsys, "pack", tmp_path / "nope.pt", "-o", tmp_path / "o.qpk")
    assert status == 1
    assert_one_line_error(err, "nope.pt", "No such file")
    status, _, err = call(capsys, "pack", tmp_path, "-o", tmp_path / "o.qpk")
    assert status == 1
    assert_one_line_error(err, str(tmp_path), "directory")
    no_leftovers(tmp_path)


@pytest.mark.parametrize("factory", [Evil, EvilOpen])
@pytest.mark.parametrize("wrap", [False, True])
def test_pack_malicious_pickle_refused(tmp_path, capsys, factory, wrap):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    payload = factory(marker)
    torch.save({"weight": torch.ones(3, 3), "x": payload} if wrap else payload, evil)
    status, _, err = call(capsys, "pack", evil, "-o", tmp_path / "out.qpk")
    assert status == 1
    assert_one_line_error(err, "evil.pt", "refused")
    assert not marker.exists()
    no_leftovers(tmp_path, "evil.pt")


def test_pack_malicious_legacy_pickle_refused(tmp_path, capsys):
    """A bare pickle stream (not torch's zip format) goes through the same safe unpickler."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        evil.write_bytes(pickle.dumps(EvilOpen(marker), protocol=protocol))
        status, _, err = call(capsys, "pack", evil, "-o", tmp_path / "out.qpk")
        assert status == 1
        assert_one_line_error(err, "evil.pt")
        assert not marker.exists()
    no_leftovers(tmp_path, "evil.pt")


def test_pack_nan_weights_names_tensor(tmp_path, capsys):
    sd = small_state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(sd, ckpt)
    status, _, err = call(capsys, "pack", ckpt, "-o", tmp_path / "out.qpk")
    assert status == 1
    assert_one_line_error(err, "nan.pt", "'fc.weight'", "NaN")
    no_leftovers(tmp_path, "nan.pt")


def test_pack_failure_keeps_existing_output(tmp_path, files, capsys):
    out = tmp_path / "out.qpk"
    out.write_bytes(b"previous contents")
    status, _, _ = call(capsys, "pack", files["list"], "-o", out)
    assert status == 1
    assert out.read_bytes() == b"previous contents"
    no_leftovers(tmp_path, "out.qpk")


# --------------------------------------------------------------------------- unwritable outputs


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_output_in_missing_directory(tmp_path, files, capsys, command):
    source = files["ckpt"] if command == "pack" else files["qpk"]
    out = tmp_path / "no" / "such" / "dir" / "out.bin"
    status, stdout, err = call(capsys, command, source, "-o", out)
    assert status == 1
    assert stdout == ""
    assert_one_line_error(err, str(out), "cannot write", "No such file")
    no_leftovers(tmp_path)


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_output_under_a_file(tmp_path, files, capsys, command):
    source = files["ckpt"] if command == "pack" else files["qpk"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = call(capsys, command, source, "-o", blocker / "out.bin")
    assert status == 1
    assert_one_line_error(err, "cannot write")
    no_leftovers(tmp_path, "file")


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_output_is_a_directory(tmp_path, files, capsys, command):
    source = files["ckpt"] if command == "pack" else files["qpk"]
    target = tmp_path / "dir"
    target.mkdir()
    status, _, err = call(capsys, command, source, "-o", target)
    assert status == 1
    assert_one_line_error(err, "is a directory")
    no_leftovers(tmp_path, "dir")
    no_leftovers(target)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to read-only dirs"
)
@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_output_in_read_only_directory(tmp_path, files, capsys, command):
    source = files["ckpt"] if command == "pack" else files["qpk"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        status, _, err = call(capsys, command, source, "-o", locked / "out.bin")
        assert status == 1
        assert_one_line_error(err, "cannot write", "Permission denied")
        no_leftovers(locked)
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- unpack


@pytest.mark.parametrize("which", ["garbage", "truncated", "tiny", "corrupt_data", "text"])
def test_unpack_bad_qpk(tmp_path, files, capsys, which):
    out = tmp_path / "out.pt"
    status, stdout, err = call(capsys, "unpack", files[which], "-o", out)
    assert status == 1
    assert stdout == ""
    assert_one_line_error(err, str(files[which]))
    no_leftovers(tmp_path)


# --------------------------------------------------------------------------- inspect


def test_inspect_table(files, capsys):
    status, out, err = call(capsys, "inspect", files["qpk"])
    assert status == 0, err
    for name in small_state_dict():
        assert name in out
    size = files["qpk"].stat().st_size
    params = numel(small_state_dict())
    assert f"{4 * params / size:.2f}x" in out
    assert f"{params:,}" in out and f"{size:,}" in out and f"{4 * params:,}" in out
    for column in ("shape", "dtype", "bits", "scheme", "granularity", "bytes"):
        assert column in out
    assert "[8, 4, 3, 3]" in out and "asymmetric-per-channel" in out and "raw" in out


def test_inspect_json(files, capsys):
    status, out, err = call(capsys, "inspect", files["qpk"], "--json")
    assert status == 0, err
    data = json.loads(out)
    expected = qpack.inspect(files["qpk"], stats=True)
    assert {k: v for k, v in data.items() if k != "totals"} == json.loads(json.dumps(expected))
    totals = data["totals"]
    params = numel(small_state_dict())
    size = files["qpk"].stat().st_size
    assert totals["tensors"] == 6
    assert totals["parameters"] == params
    assert totals["file_size"] == size
    assert totals["float32_bytes"] == 4 * params
    assert totals["ratio"] == pytest.approx(4 * params / size)


def test_inspect_subprocess_json_parses(files):
    res = run_cli("inspect", "--json", files["qpk"])
    assert res.returncode == 0, res.stderr
    assert [t["name"] for t in json.loads(res.stdout)["tensors"]] == list(small_state_dict())


@pytest.mark.parametrize("which", ["garbage", "truncated", "tiny", "corrupt_header", "ckpt"])
def test_inspect_bad_file(files, capsys, which):
    status, stdout, err = call(capsys, "inspect", files[which])
    assert status == 1
    assert stdout == ""
    assert_one_line_error(err, str(files[which]))


def test_inspect_reads_only_the_header(files, capsys):
    """A damaged tensor payload does not stop inspect; verify is what catches it."""
    status, _, _ = call(capsys, "inspect", files["corrupt_data"])
    assert status == 0


def test_inspect_and_verify_missing_file(tmp_path, capsys):
    for command in ("inspect", "verify"):
        status, _, err = call(capsys, command, tmp_path / "gone.qpk")
        assert status == 1
        assert_one_line_error(err, "gone.qpk", "No such file")


# --------------------------------------------------------------------------- verify


def test_verify_ok(files, capsys):
    status, out, err = call(capsys, "verify", files["qpk"])
    assert status == 0, err
    assert out.strip() == f"OK {files['qpk']}: 6 tensors, checksums valid"


@pytest.mark.parametrize(
    "which, fragment",
    [
        ("garbage", "magic"),
        ("truncated", "bytes"),
        ("tiny", "shorter"),
        ("corrupt_data", "data checksum"),
        ("corrupt_header", "header checksum"),
        ("text", "magic"),
    ],
)
def test_verify_bad_file(files, capsys, which, fragment):
    status, out, err = call(capsys, "verify", files[which])
    assert status == 1
    assert out == ""
    assert_one_line_error(err, str(files[which]), fragment)


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("command", [[], ["pack"], ["unpack"], ["inspect"], ["verify"], ["demo"]])
def test_help_exits_0(capsys, command):
    status, out, _ = call(capsys, *command, "--help")
    assert status == 0
    assert out.startswith("usage: qpack")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["pack", "IN", "-o", "OUT", "--bits", "0"], "1 to 8"),
        (["pack", "IN", "-o", "OUT", "--bits", "9"], "1 to 8"),
        (["pack", "IN", "-o", "OUT", "--bits", "four"], "1 to 8"),
        (["pack", "IN", "-o", "OUT", "--scheme", "nope"], "unknown scheme"),
        (["pack", "IN", "-o", "OUT", "--metadata", "novalue"], "KEY=VALUE"),
        (["pack", "IN"], "-o"),
        (["unpack", "IN"], "-o"),
        (["inspect"], "IN"),
        (["demo", "--bits", "8", "12"], "1 to 8"),
        (["demo", "--scheme", "nope"], "unknown scheme"),
        (["demo", "--samples", "0"], "positive"),
        ([], "COMMAND"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)  # nothing may be written, whatever the relative OUT
    status, out, err = call(capsys, *args)
    assert status == 2
    assert out == ""
    assert_usage_error(err, fragment)
    no_leftovers(tmp_path)


def test_keyboard_interrupt_in_process(monkeypatch, capsys, files):
    import qpack.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.verify, "run", interrupted)
    status, _, err = call(capsys, "verify", files["qpk"])
    assert status == 130
    assert "Traceback" not in err


# --------------------------------------------------------------------------- demo


def test_demo_command(tmp_path, capsys):
    from qpack.demo.unet import UNet

    ckpt = tmp_path / "unet.pt"
    torch.manual_seed(0)
    torch.save({"model": UNet().state_dict(), "step": 0}, ckpt)
    status, out, err = call(
        capsys,
        "demo",
        "--checkpoint",
        ckpt,
        "--samples",
        "16",
        "--bits",
        "8",
        "2",
        "--uniform",
    )
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "stored", "as"]
    rows = [line.split() for line in lines[2:6]]
    assert [r[0] for r in rows] == ["float32", "origin", "qpack", "origin"]
    assert rows[1][1] == "8-bit" and rows[3][1] == "2-bit"
    assert "16 held-out patches" in out


def test_demo_bad_checkpoints(tmp_path, files, capsys):
    status, _, err = call(capsys, "demo", "--checkpoint", files["ckpt"], "--samples", "4")
    assert status == 1
    assert_one_line_error(err, "model.pt", "does not fit the UNet")
    status, _, err = call(capsys, "demo", "--checkpoint", files["list"], "--samples", "4")
    assert status == 1
    assert_one_line_error(err, "list.pt", "not a checkpoint")
    status, _, err = call(capsys, "demo", "--checkpoint", tmp_path / "gone.pt")
    assert status == 1
    assert_one_line_error(err, "gone.pt", "No such file")


def test_pack_chooses_widths_per_tensor_and_fits_max_size(tmp_path, files, capsys):
    """Default packing picks widths per tensor (Huffman-coded, never larger than uniform
    fixed-width at 6 bits, whose reference is per channel alone: up to 5 bits these rows
    of no whole 32-weight block are held to float16, as a GGUF file keeps them); --max-size
    never exceeds its budget; --no-entropy is fixed-width 1.0."""
    sizes = {}
    for name, extra in {
        "chosen": [],
        "uniform": ["--uniform"],
        "fixed": ["--no-entropy"],
    }.items():
        out = tmp_path / f"{name}.qpk"
        status, stdout, err = call(capsys, "pack", files["ckpt"], "-o", out, "--bits", "6", *extra)
        assert status == 0, err
        sizes[name] = out.stat().st_size
        if name == "fixed":
            info = qpack.inspect(out)
            assert info["version"] == "1.0"
            assert {t["storage"] for t in info["tensors"]} <= {"packed", "raw"}
    assert sizes["chosen"] <= sizes["fixed"] and sizes["uniform"] <= sizes["fixed"]
    budget = sizes["fixed"] * 95 // 100
    out = tmp_path / "budget.qpk"
    status, stdout, err = call(capsys, "pack", files["ckpt"], "-o", out, "--max-size", budget)
    assert status == 0, err
    assert out.stat().st_size <= budget
    assert f"at most {budget:,} bytes" in stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-size", "12"],  # no file can be that small
        ["--max-size", "lots"],
        ["--max-size", "10k", "--no-entropy"],
        ["--calibration", "cal.npy"],  # not a UNet checkpoint
    ],
)
def test_pack_budget_errors(tmp_path, files, capsys, extra):
    np.save(tmp_path / "cal.npy", np.zeros((2, 1, 36, 36), np.float32))
    extra = [str(tmp_path / e) if e.endswith(".npy") else e for e in extra]
    status, _, err = call(capsys, "pack", files["ckpt"], "-o", tmp_path / "o.qpk", *extra)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("qpack: error: ")
    assert status == (1 if extra[:2] == ["--max-size", "12"] else 2), err
    assert not (tmp_path / "o.qpk").exists()


def test_safetensors_in_and_out(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    state = {"conv.weight": torch.randn(8, 4, 3, 3), "conv.bias": torch.randn(8)}
    src = tmp_path / "model.safetensors"
    st.save_file(state, str(src))
    packed = tmp_path / "m.qpk"
    status, _, err = call(capsys, "pack", src, "-o", packed, "--bits", "8", "--uniform")
    assert status == 0, err
    out = tmp_path / "back.safetensors"
    status, _, err = call(capsys, "unpack", packed, "-o", out)
    assert status == 0, err
    back = st.load_file(str(out))
    expected = qpack.load(packed)
    assert set(back) == set(expected)  # safetensors keeps no order
    assert all(torch.equal(back[k], expected[k]) for k in back)
    assert torch.equal(back["conv.bias"], state["conv.bias"])  # biases stay exact
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    status, _, err = call(capsys, "pack", garbage, "-o", tmp_path / "x.qpk")
    assert status == 1 and "bad.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "x.qpk").exists()


def test_safetensors_input_packs_deterministically(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(4)
    state = {f"layer{i}.weight": torch.randn(4, 4) for i in range(12)}
    src = tmp_path / "model.safetensors"
    st.save_file(state, str(src))
    blobs = set()
    for i in range(3):
        env = dict(os.environ, PYTHONHASHSEED=str(i))
        out = tmp_path / f"m{i}.qpk"
        subprocess.run(
            [sys.executable, "-m", "qpack", "pack", str(src), "-o", str(out), "--uniform"],
            check=True,
            env=env,
            capture_output=True,
        )
        blobs.add(out.read_bytes())
    assert len(blobs) == 1


# --------------------------------------------------------------------------- progress


def run_on_terminal(*args: str) -> tuple[int, str]:
    """Run ``python -m qpack ARGS`` with stderr on a pseudo-terminal; (status, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpack", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=TIMEOUT), b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_for_large_models(tmp_path):
    from qpack.cli import PROGRESS_MIN_PARAMS

    rows = -(-PROGRESS_MIN_PARAMS // 4096)
    big = {"w": torch.randn(rows, 4096) * 0.02, "b": torch.zeros(rows)}
    torch.save(big, tmp_path / "big.pt")
    status, err = run_on_terminal("pack", tmp_path / "big.pt", "-o", tmp_path / "big.qpk")
    assert status == 0, err
    assert "packing" in err and "param" in err, err
    status, err = run_on_terminal("unpack", tmp_path / "big.qpk", "-o", tmp_path / "back.pt")
    assert status == 0, err
    assert "unpacking" in err, err
    # without a terminal there is no bar
    res = run_cli("pack", tmp_path / "big.pt", "-o", tmp_path / "again.qpk")
    assert res.returncode == 0 and res.stderr == "", res.stderr
