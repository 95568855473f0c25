"""`metascale eval --checkpoint` and the result line of `run`/`eval`: a file that is not a checkpoint is one
CheckpointError line (exit 2), and the JSON line stays strict JSON when a number is NaN. The byte-level cases here are
format-1 `.ckpt` files (still read); tests/test_checkpoint.py has those of today's step folders."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metascale.cli import result_line
from metascale.cluster import checkpoint
from metascale.config import parse_spec
from metascale.errors import CheckpointError
from metascale.models import build_model

TINY = """name: tiny
eval: {final_episodes: 4}
logging: {wandb: {mode: disabled}, progress: false}
cluster: {address: inline}
"""


def _strict(line: str):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse and Go's encoding/json do."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _eval(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    return subprocess.run(
        [sys.executable, "-m", "metascale", "eval", str(spec), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


def _with_header(payload: bytes) -> bytes:
    return checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "no such checkpoint file"),
        ("dir", "is a directory without a manifest.json: not a checkpoint, or one whose write did not finish"),
        (b"", "not a metascale checkpoint (bad header)"),
        (b"name: tiny\n", "not a metascale checkpoint (bad header)"),
        (checkpoint.MAGIC + b"00", "truncated before its checksum (torn write)"),
        (_with_header(b"payload")[:-1] + b"P", "checksum mismatch"),
        (_with_header(b"not a torch file"), "payload does not load ("),
        (_with_header(_saved(Path("/etc"))), "payload does not load (Weights only load failed"),
        (_with_header(_saved([1, 2])), "payload is a list, not a checkpoint's state dict"),
    ],
    ids=["missing", "directory", "empty", "text", "torn", "checksum", "not-torch", "not-weights-only", "list"],
)
def test_read_names_what_is_wrong_in_one_line(tmp_path, content, needle):
    path = tmp_path / "step-00000001.ckpt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        checkpoint.read(str(path))
    assert e.value.exit_code == 2 and needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(f"{path}: ")


def test_eval_checkpoint_that_is_not_a_checkpoint_is_one_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for where, needle in [
        ("/nonexistent", "/nonexistent: no such checkpoint file"),
        (str(tmp_path), "is a directory"),
        (str(text), "not a metascale checkpoint"),
    ]:
        r = _eval(tmp_path, "--checkpoint", where)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_result_line_writes_non_finite_numbers_as_null():
    result = {
        "status": "finished",
        "step": 3,
        "final/loss": float("nan"),
        "final/loss_ci95": float("inf"),
        "nested": {"x": float("-inf"), "ok": 0.5, "xs": [1.0, float("nan")]},
        "none": None,
    }
    line = result_line(result)
    assert "\n" not in line
    assert _strict(line) == {
        "status": "finished",
        "step": 3,
        "final/loss": None,
        "final/loss_ci95": None,
        "nested": {"x": None, "ok": 0.5, "xs": [1.0, None]},
        "none": None,
    }
    assert _strict(result_line({"a": 1e308, "b": -0.0})) == {"a": 1e308, "b": -0.0}


def test_eval_of_a_diverged_checkpoint_prints_strict_json(tmp_path):
    """Every parameter NaN, as after a divergence: the loss is NaN, and the line says null."""
    model = build_model(parse_spec({}).model, 1)
    params = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    path = checkpoint.save(str(tmp_path / "ck"), 7, {"step": 7, "params": params}, keep=1)
    r = _eval(tmp_path, "--checkpoint", path)
    assert r.returncode == 0, r.stderr
    result = _strict(r.stdout.splitlines()[-1])
    assert result["checkpoint_step"] == 7 and result["test/loss"] is None and result["test/episodes"] == 4
