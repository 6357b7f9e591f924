"""What the command line must never do to a user's files, and what it must understand of
their inputs: outputs that are inputs or exist, extensions that name another format,
checkpoint wrappers and prefixes, and model-aware packing of any model (--model)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

import qpack
from qpack.cli import main
from qpack.reader import Reader

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.conv = nn.Conv1d(3, hidden, 3, padding=1)
        self.fc = nn.Linear(hidden * 8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
'''


def call(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("qpack: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, err)


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(16, 3, 3), "conv.bias": torch.randn(16),
             "fc.weight": torch.randn(4, 128), "fc.bias": torch.randn(4)}
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path


def test_output_that_is_the_input_is_refused(tmp_path, ckpt, capsys):
    before = ckpt.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    for out in (ckpt, link, tmp_path / "." / "model.pt"):
        status, _, err = call(capsys, "pack", ckpt, "-o", out, "--force")
        assert status in (1, 2)
        assert "Traceback" not in err
        assert ckpt.read_bytes() == before
    status, _, err = call(capsys, "pack", ckpt, "-o", tmp_path / "m.qpk")
    assert status == 0, err
    qpk = tmp_path / "m.qpk"
    before = qpk.read_bytes()
    status, _, err = call(capsys, "unpack", qpk, "-o", qpk.with_suffix(".bin"))
    assert status == 0, err
    os.link(qpk, tmp_path / "hard.pt")
    status, _, err = call(capsys, "unpack", qpk, "-o", tmp_path / "hard.pt", "--force")
    assert status == 1
    one_line(err, "input")
    assert qpk.read_bytes() == before


def test_existing_output_needs_force(tmp_path, ckpt, capsys):
    out = tmp_path / "out.qpk"
    out.write_bytes(b"precious")
    out.chmod(0o640)
    status, stdout, err = call(capsys, "pack", ckpt, "-o", out)
    assert status == 1 and stdout == ""
    one_line(err, str(out), "exists", "--force")
    assert out.read_bytes() == b"precious"
    status, _, err = call(capsys, "pack", ckpt, "-o", out, "--force")
    assert status == 0, err
    assert set(qpack.load(out)) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the replaced file's mode is kept


def test_new_outputs_honour_the_umask(tmp_path, ckpt, capsys):
    old = os.umask(0o022)
    try:
        status, _, err = call(capsys, "pack", ckpt, "-o", tmp_path / "a.qpk")
        assert status == 0, err
        assert stat.S_IMODE((tmp_path / "a.qpk").stat().st_mode) == 0o644
        os.umask(0o077)
        status, _, err = call(capsys, "unpack", tmp_path / "a.qpk", "-o", tmp_path / "b.pt")
        assert status == 0, err
        assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_symlinked_output_stays_a_link(tmp_path, ckpt, capsys):
    target = tmp_path / "real.qpk"
    target.write_bytes(b"old")
    link = tmp_path / "link.qpk"
    link.symlink_to(target)
    status, _, err = call(capsys, "pack", ckpt, "-o", link, "--force")
    assert status == 0, err
    assert link.is_symlink() and qpack.inspect(target)["tensors"]


@pytest.mark.parametrize(
    ("command", "out", "fragment"),
    [
        ("pack", "out.pt", "does not write .pt"),
        ("pack", "out.safetensors", "does not write .safetensors"),
        ("unpack", "out.qpk", "does not write .qpk"),
        ("unpack", "out.npz", "does not write .npz"),
    ],
)
def test_extension_naming_another_format_is_a_usage_error(
    tmp_path, ckpt, capsys, command, out, fragment
):
    source = ckpt
    if command == "unpack":
        source = tmp_path / "m.qpk"
        qpack.save(torch.load(ckpt, weights_only=True), source)
    status, _, err = call(capsys, command, source, "-o", tmp_path / out)
    assert status == 2
    one_line(err, fragment)
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model_state", "model"])
def test_wrappers_are_found_and_reported(tmp_path, ckpt, capsys, key):
    state = torch.load(ckpt, weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": 0.1}}, wrapped)
    status, stdout, err = call(capsys, "pack", wrapped, "-o", tmp_path / "w.qpk")
    assert status == 0, err
    assert f"under {key!r}" in stdout
    assert qpack.inspect(tmp_path / "w.qpk")["metadata"]["source_key"] == key


def test_data_parallel_prefix_is_removed_and_recorded(tmp_path, ckpt, capsys):
    state = torch.load(ckpt, weights_only=True)
    prefixed = tmp_path / "dp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, prefixed)
    status, stdout, err = call(capsys, "pack", prefixed, "-o", tmp_path / "dp.qpk")
    assert status == 0, err
    assert list(qpack.load(tmp_path / "dp.qpk")) == list(state)
    assert qpack.inspect(tmp_path / "dp.qpk")["metadata"]["source_prefix"] == "module."
    assert "'module.' removed" in stdout


def test_tensors_beside_a_wrapper_are_not_dropped_silently(tmp_path, ckpt, capsys):
    state = torch.load(ckpt, weights_only=True)
    both = tmp_path / "both.pt"
    torch.save({"state_dict": state, "ema.weight": torch.ones(2, 2)}, both)
    status, _, err = call(capsys, "pack", both, "-o", tmp_path / "b.qpk")
    assert status == 1
    one_line(err, "beside it", "ema.weight")


def test_a_pickled_module_gets_advice(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    status, _, err = call(capsys, "pack", path, "-o", tmp_path / "w.qpk")
    assert status == 1
    one_line(err, "whole pickled model", "state_dict()")


def test_pack_any_model_with_its_calibration(tmp_path, capsys):
    (tmp_path / "net.py").write_text(NET)
    torch.manual_seed(1)
    scope: dict = {}
    exec(compile(NET, "net.py", "exec"), scope)  # noqa: S102 (the test's own source)
    model = scope["Net"]()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(64, 3, 8)))
    out = tmp_path / "net.qpk"
    status, stdout, err = call(
        capsys, "pack", tmp_path / "net.pt", "-o", out, "--bits", "4",
        "--model", f"{tmp_path / 'net.py'}:Net", "--model-args", '{"hidden": 16}',
        "--calibration", tmp_path / "calib.npy",
    )
    assert status == 0, err
    assert "error-compensating rounding on 2/2 tensors" in stdout
    assert "the model's output error" in stdout
    fresh = scope["Net"]()
    qpack.load_into(fresh, out)


@pytest.mark.parametrize(
    ("extra", "status", "fragment"),
    [
        (["--model", "NET:Net"], 2, "--model needs --calibration"),
        (["--calibration", "CAL"], 2, "--calibration needs --model"),
        (["--model-args", "{}"], 2, "--model-args needs --model"),
        (["--model", "no_such_module_xyz:Net", "--calibration", "CAL"], 1, "cannot import"),
        (["--model", "NET:Nope", "--calibration", "CAL"], 1, "has no 'Nope'"),
        (["--model", "NET:Net", "--model-args", "[1]", "--calibration", "CAL"], 1,
         "JSON object"),
        (["--model", "NET:Net", "--model-args", '{"hidden": 5}', "--calibration", "CAL"], 1,
         "does not fit"),
        (["--model", "NET:Net", "--calibration", "BADCAL"], 1, "model failed"),
        (["--rounding", "gptq"], 2, "--rounding gptq needs"),
    ],
)
def test_model_options_fail_cleanly(tmp_path, ckpt, capsys, extra, status, fragment):
    (tmp_path / "net.py").write_text(NET)
    np.save(tmp_path / "cal.npy", np.zeros((4, 3, 8), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((4, 7), np.float32))
    names = {"NET": str(tmp_path / "net.py"), "CAL": str(tmp_path / "cal.npy"),
             "BADCAL": str(tmp_path / "bad.npy")}
    # longest placeholder first: BADCAL before CAL
    order = sorted(names, key=len, reverse=True)
    args = [next((names[k] + a[len(k):] for k in order if a.startswith(k)), a) for a in extra]
    got, stdout, err = call(capsys, "pack", ckpt, "-o", tmp_path / "o.qpk", *args)
    assert got == status, err
    assert stdout == ""
    one_line(err, fragment)
    assert not (tmp_path / "o.qpk").exists()


def test_keep_raw_and_fractional_bits(tmp_path, ckpt, capsys):
    out = tmp_path / "k.qpk"
    status, _, err = call(capsys, "pack", ckpt, "-o", out, "--bits", "3.5",
                          "--keep-raw", "fc.*")
    assert status == 0, err
    rows = {t["name"]: t for t in qpack.inspect(out)["tensors"]}
    assert rows["fc.weight"]["storage"] == "raw"
    assert rows["conv.weight"]["storage"] in ("packed", "huffman")
    state = torch.load(ckpt, weights_only=True)
    assert torch.equal(qpack.load(out)["fc.weight"], state["fc.weight"])
    status, _, err = call(capsys, "pack", ckpt, "-o", tmp_path / "u.qpk", "--bits", "3.5",
                          "--uniform", "--keep-raw", "conv.weight")
    assert status == 0, err
    rows = {t["name"]: t for t in qpack.inspect(tmp_path / "u.qpk")["tensors"]}
    assert rows["conv.weight"]["storage"] == "raw" and rows["fc.weight"]["bits"] == 4


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--keep-raw", "nope.*"], "matches no tensor"),
        (["--max-size", "10k", "--bits", "4"], "drop --bits"),
        (["--bits", "0.5"], "from 1 to 8"),
        (["--bits", "nan"], "from 1 to 8"),
    ],
)
def test_contradictory_pack_options_are_usage_errors(tmp_path, ckpt, capsys, extra, fragment):
    status, _, err = call(capsys, "pack", ckpt, "-o", tmp_path / "o.qpk", *extra)
    assert status == 2
    one_line(err, fragment)


def test_weights_near_the_float32_limit_pack_by_default(tmp_path, capsys):
    huge = {"w": torch.full((8, 8), 3e38) * torch.linspace(-1, 1, 64).reshape(8, 8)}
    torch.save(huge, tmp_path / "huge.pt")
    status, _, err = call(capsys, "pack", tmp_path / "huge.pt", "-o", tmp_path / "h.qpk")
    assert status == 0, err
    back = qpack.load(tmp_path / "h.qpk")["w"]
    assert torch.isfinite(back).all()


def test_inspect_flags_a_bad_tensor_and_shows_the_rest(tmp_path, ckpt, capsys):
    out = tmp_path / "m.qpk"
    qpack.save(torch.load(ckpt, weights_only=True), out, bits=4, uniform=True)
    with Reader(out) as r:
        data_start, entry = r.header.data_start, r.entry("fc.weight")
    blob = bytearray(out.read_bytes())
    blob[data_start + entry.offset] ^= 0xFF  # offsets count from the data section
    bad = tmp_path / "bad.qpk"
    bad.write_bytes(bytes(blob))
    status, stdout, err = call(capsys, "inspect", bad)
    assert status == 0, err
    assert "conv.weight" in stdout and "BAD tensor 'fc.weight'" in stdout
    status, _, err = call(capsys, "verify", bad)
    assert status == 1
    one_line(err, "fc.weight", "checksum")


def test_unpack_refuses_what_safetensors_cannot_hold(tmp_path, capsys):
    qpack.save({"__metadata__": torch.ones(2)}, tmp_path / "m.qpk")
    status, _, err = call(capsys, "unpack", tmp_path / "m.qpk", "-o", tmp_path / "m.safetensors")
    assert status == 1
    one_line(err, "__metadata__")
    assert not (tmp_path / "m.safetensors").exists()


def test_tensors_without_values_are_refused_in_one_line(tmp_path, capsys):
    for name, value in [("meta", torch.zeros(3, 3, device="meta")),
                        ("sparse", torch.eye(3).to_sparse())]:
        with pytest.raises(qpack.QpackError, match=name):
            qpack.save({"w": value}, tmp_path / "x.qpk")
    with pytest.raises(qpack.QpackError, match="lone surrogate"):
        qpack.save({"\udcff": torch.ones(2, 2)}, tmp_path / "x.qpk")
    qpack.save({"w": torch.ones(2, 2)}, tmp_path / "ok.qpk")
    if not torch.cuda.is_available():
        with pytest.raises(qpack.QpackError, match="cannot use device 'cuda'"):
            qpack.load(tmp_path / "ok.qpk", device="cuda")


def test_inspect_shows_the_levels_of_a_fractional_width(tmp_path, capsys):
    rng = np.random.default_rng(0)
    qpack.numpy.save({"w": rng.normal(size=(64, 64)).astype(np.float32)}, tmp_path / "f.qpk",
                     bits=2.5, uniform=True)
    status, stdout, err = call(capsys, "inspect", tmp_path / "f.qpk")
    assert status == 0, err
    assert "3 (6 lv)" in stdout
    assert qpack.inspect(tmp_path / "f.qpk", stats=True)["tensors"][0]["levels"] == 6
