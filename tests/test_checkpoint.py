"""Checkpoints as folders the ecosystem reads: the meta-parameters in safetensors, the optimiser state and RNG in a
weights_only torch file, a manifest written last with every file's sha256. A checkpoint counts only once its manifest
is written; a torn or corrupt newest one is reported and the previous good one used; `keep` prunes; the lease file
is left alone; any fsspec URL works; format-1 `.ckpt` files of earlier runs are still read."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator
from metascale.config import dump_spec
from metascale.errors import CheckpointError
from metascale.train import train


def _state(step: int, fill: float = 1.0) -> dict:
    return {
        "step": step,
        "params": {"w": torch.full((2, 3), fill, dtype=torch.float64), "lr": torch.tensor(fill)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": {"torch": torch.get_rng_state()},
        "spec": "name: t\n",
        "wandb_run_id": "abc",
        "skipped_steps": 0,
    }


def _legacy(path: Path, state: dict) -> None:
    """A format-1 checkpoint as the previous release wrote it: header line, then the torch payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def test_a_checkpoint_is_a_folder_of_files_other_tools_read(tmp_path, make_job, umask):
    spec = make_job(tmp_path, algorithm__name="metasgd")  # meta-parameters beyond the model's: the learned rates
    coord = Coordinator(spec)
    coord.step, coord.skipped_steps = 7, 2
    state = {**coord.state_dict(), "spec": dump_spec(spec), "wandb_run_id": "run-123"}
    path = Path(checkpoint.save(str(tmp_path / "ck"), 7, state, keep=3))
    assert path.name == "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "params.safetensors", "state.pt"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-00000007"]  # no temporary folder left
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((path / "params.safetensors").stat().st_mode) == 0o666 & ~umask

    params = load_file(path / "params.safetensors")  # the ecosystem's own reader
    assert params.keys() == coord.params.keys() and any(k.startswith("lr.") for k in params)
    for k, v in coord.params.items():
        assert torch.equal(params[k], v.detach()), k
    rest = torch.load(path / "state.pt", weights_only=True)
    assert set(rest) == {"optimizer", "rng"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "metascale-checkpoint" and manifest["version"] == 2
    assert (manifest["step"], manifest["skipped_steps"], manifest["wandb_run_id"]) == (7, 2, "run-123")
    assert manifest["spec"] == dump_spec(spec)
    for name in ("params.safetensors", "state.pt"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    back = checkpoint.read(str(path))
    assert back["step"] == 7 and back["skipped_steps"] == 2 and back["wandb_run_id"] == "run-123"
    other = Coordinator(spec)
    other.load_state_dict(back)
    assert (
        other.step == 7 and other.optimizer.state_dict()["param_groups"] == coord.optimizer.state_dict()["param_groups"]
    )
    for k in coord.params:
        assert torch.equal(other.params[k], coord.params[k]), k
    assert checkpoint.read(str(path / "manifest.json"))["step"] == 7  # the manifest stands for its folder


def _damage_params_byte(p: Path) -> None:
    blob = bytearray((p / "params.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (p / "params.safetensors").write_bytes(bytes(blob))


def _truncate_state(p: Path) -> None:
    (p / "state.pt").write_bytes((p / "state.pt").read_bytes()[:100])


def _edit_manifest(p: Path) -> None:  # valid JSON, but not what was written
    m = json.loads((p / "manifest.json").read_text())
    m["step"] = 1
    (p / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "flipped byte": (_damage_params_byte, "params.safetensors: checksum mismatch (torn or corrupt write)"),
    "truncated file": (_truncate_state, "state.pt has 100 bytes, its manifest says"),
    "missing file": (lambda p: (p / "params.safetensors").unlink(), "params.safetensors is missing"),
    "torn manifest": (
        lambda p: (p / "manifest.json").write_bytes((p / "manifest.json").read_bytes()[:40]),
        "manifest.json is not JSON (torn or corrupt write)",
    ),
    "edited manifest": (_edit_manifest, "manifest.json: checksum mismatch"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog, damage):
    d = str(tmp_path / "ck")
    checkpoint.save(d, 1, _state(1, 1.0), keep=3)
    path = checkpoint.save(d, 2, _state(2, 2.0), keep=3)
    harm, needle = DAMAGE[damage]
    harm(Path(path))
    assert checkpoint.list_steps(d) == [1, 2]  # listed (its manifest exists), but it does not verify
    with caplog.at_level(logging.WARNING):
        step, state = checkpoint.load_latest(d)
    assert step == 1 and torch.equal(state["params"]["w"], torch.full((2, 3), 1.0, dtype=torch.float64))
    assert needle in caplog.text and "falling back to the previous one" in caplog.text
    with pytest.raises(CheckpointError) as e:
        checkpoint.read(path)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")


def test_a_checkpoint_without_its_manifest_does_not_count_and_the_next_save_clears_it(tmp_path, caplog):
    """What a writer killed mid-write leaves: locally a temporary folder, on an object store a step folder whose
    manifest was never written. Neither is listed or loaded, and neither survives the next save."""
    d = tmp_path / "ck"
    checkpoint.save(str(d), 1, _state(1), keep=3)
    full = Path(checkpoint.save(str(d), 2, _state(2), keep=3))
    (d / ".tmp-step-00000003-0123456789ab").mkdir()  # killed while writing step 3 locally
    (d / ".tmp-step-00000003-0123456789ab" / "params.safetensors").write_bytes(b"half")
    (full / "manifest.json").rename(d / "kept-aside.json")  # step 2 as an object store holds it before its manifest
    with caplog.at_level(logging.WARNING):
        assert checkpoint.list_steps(str(d)) == [1] and checkpoint.load_latest(str(d))[0] == 1
    assert "skipping" not in caplog.text  # not a damaged checkpoint: one that never was
    (d / "kept-aside.json").unlink()
    checkpoint.save(str(d), 4, _state(4), keep=3)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000001", "step-00000004"]


def test_keep_prunes_older_checkpoints_and_leaves_the_lease_alone(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / ".lease").write_text('{"token": "x"}')
    (d / ".lease.takeover").write_text("{}")
    for s in range(1, 6):
        checkpoint.save(str(d), s, {"step": s}, keep=2)
    assert checkpoint.list_steps(str(d)) == [4, 5]
    assert sorted(p.name for p in d.iterdir()) == [".lease", ".lease.takeover", "step-00000004", "step-00000005"]
    assert (d / ".lease").read_text() == '{"token": "x"}'


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    """After a fall-back past a damaged newer checkpoint, the run reaches that step again and writes it anew."""
    d = str(tmp_path / "ck")
    checkpoint.save(d, 1, _state(1, 1.0), keep=3)
    path = checkpoint.save(d, 2, _state(2, 2.0), keep=3)
    _damage_params_byte(Path(path))
    assert checkpoint.load_latest(d)[0] == 1
    checkpoint.save(d, 2, _state(2, 5.0), keep=3)
    step, state = checkpoint.load_latest(d)
    assert step == 2 and float(state["params"]["lr"]) == 5.0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000001", "step-00000002"]


def test_a_failed_write_leaves_the_previous_checkpoints_and_no_temporary_folder(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    checkpoint.save(str(d), 1, _state(1), keep=3)
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(str(d), 2, _state(2), keep=3)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000001"]
    assert checkpoint.load_latest(str(d))[0] == 1


def _consistent(folder: Path, name: str, data: bytes) -> None:
    """Replaces a file of a checkpoint and re-signs the manifest: damage no checksum can see."""
    (folder / name).write_bytes(data)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m["manifest_sha256"] = checkpoint._manifest_sha256(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _resigned_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    m["manifest_sha256"] = checkpoint._manifest_sha256(m)
    (folder / "manifest.json").write_text(json.dumps(m))


FOLDER_CASES = {
    "not safetensors": (
        lambda f: _consistent(f, "params.safetensors", b"not safetensors at all"),
        "params.safetensors does not load (",
    ),
    "not weights-only": (
        lambda f: _consistent(f, "state.pt", _saved({"x": Path("/etc")})),
        "state.pt does not load (Weights only load failed",
    ),
    "state is a list": (
        lambda f: _consistent(f, "state.pt", _saved([1, 2])),
        "state.pt is a list, not a checkpoint's state dict",
    ),
    "newer format": (lambda f: _resigned_manifest(f, version=3), "format version 3, this metascale reads up to 2"),
    "foreign manifest": (
        lambda f: (f / "manifest.json").write_text('{"format": "other"}'),
        "is not a metascale checkpoint manifest",
    ),
    "path in a file name": (lambda f: _resigned_manifest(f, files={"../x": {"sha256": "0", "bytes": 0}}), "malformed"),
}


@pytest.mark.parametrize("case", FOLDER_CASES, ids=list(FOLDER_CASES))
def test_read_of_a_bad_folder_names_what_is_wrong_in_one_line(tmp_path, case):
    folder = Path(checkpoint.save(str(tmp_path / "ck"), 3, _state(3), keep=1))
    harm, needle = FOLDER_CASES[case]
    harm(folder)
    with pytest.raises(CheckpointError) as e:
        checkpoint.read(str(folder))
    assert e.value.exit_code == 2 and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_format_1_checkpoints_of_earlier_runs_are_still_read_and_pruned(tmp_path, caplog):
    d = tmp_path / "ck"
    d.mkdir()
    _legacy(d / "step-00000002.ckpt", _state(2, 2.0))
    assert checkpoint.list_steps(str(d)) == [2]
    step, state = checkpoint.load_latest(str(d))
    assert step == 2 and state["wandb_run_id"] == "abc" and float(state["params"]["lr"]) == 2.0
    newer = checkpoint.save(str(d), 4, _state(4, 4.0), keep=2)
    assert checkpoint.list_steps(str(d)) == [2, 4]
    _damage_params_byte(Path(newer))
    assert checkpoint.load_latest(str(d))[0] == 2  # falls back across formats
    checkpoint.save(str(d), 6, _state(6), keep=1)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000006"]


def test_a_run_resumes_from_a_format_1_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, make_job):
    steps = {"outer__steps": 4, "checkpoint__every": 2, "eval__every": 0, "cluster__address": "inline"}
    clean = make_job(tmp_path / "clean", **steps)
    train(clean)
    old = make_job(tmp_path / "old", **{**steps, "outer__steps": 2})
    train(old)
    directory = Path(old.path(old.checkpoint.dir))
    _legacy(directory / "step-00000002.ckpt", checkpoint.read(str(directory / "step-00000002")))
    for p in (directory / "step-00000002").iterdir():
        p.unlink()
    (directory / "step-00000002").rmdir()  # the directory as the previous release left it
    out = train(make_job(tmp_path / "old", **steps), resume=True)
    assert out["step"] == 4
    reference, got = checkpoint.load_latest(clean.path(clean.checkpoint.dir)), checkpoint.load_latest(str(directory))
    assert got[0] == 4
    for k, v in reference[1]["params"].items():
        assert torch.equal(v, got[1]["params"][k]), k


def test_resolve_takes_a_folder_its_manifest_a_file_or_a_checkpoint_directory(tmp_path, caplog):
    d = tmp_path / "ck"
    checkpoint.save(str(d), 1, _state(1), keep=3)
    second = checkpoint.save(str(d), 2, _state(2), keep=3)
    _legacy(tmp_path / "old.ckpt", _state(9))
    assert checkpoint.resolve(str(d / "step-00000001"))[0] == 1
    assert checkpoint.resolve(f"{second}/manifest.json")[0] == 2
    assert checkpoint.resolve(str(tmp_path / "old.ckpt"))[0] == 9
    assert checkpoint.resolve(str(d))[0] == 2  # a run's directory: its newest good checkpoint
    _damage_params_byte(Path(second))
    assert checkpoint.resolve(str(d))[0] == 1 and "checksum mismatch" in caplog.text
    _damage_params_byte(d / "step-00000001")
    with pytest.raises(CheckpointError, match="none of its checkpoints is readable"):
        checkpoint.resolve(str(d))
    with pytest.raises(CheckpointError, match="is a directory without a manifest.json"):
        checkpoint.resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint file or folder"):
        checkpoint.resolve(str(tmp_path / "nothing"))


def test_any_fsspec_url_works_the_same(tmp_path):
    import fsspec

    d = f"memory://ck-{os.getpid()}-{tmp_path.name}"
    for s in range(1, 4):
        path = checkpoint.save(d, s, _state(s, float(s)), keep=2)
    assert path == f"{d}/step-00000003" and checkpoint.list_steps(d) == [2, 3]
    fs = fsspec.filesystem("memory")
    root = d.removeprefix("memory://")
    blob = bytearray(fs.cat_file(f"{root}/step-00000003/params.safetensors"))
    blob[-2] ^= 0xFF
    fs.pipe_file(f"{root}/step-00000003/params.safetensors", bytes(blob))
    step, state = checkpoint.load_latest(d)
    assert step == 2 and float(state["params"]["lr"]) == 2.0
    fs.rm(f"/{root}", recursive=True)


def test_on_an_object_store_the_manifest_is_the_last_put(tmp_path, monkeypatch):
    """A writer that dies after some of a checkpoint's PUTs leaves no checkpoint: its manifest is the last one."""
    import fsspec

    d = f"memory://ck-puts-{os.getpid()}-{tmp_path.name}"
    checkpoint.save(d, 1, _state(1), keep=3)
    fs = fsspec.filesystem("memory")
    put = type(fs).pipe_file
    for dies_after in (1, 2):
        done = []

        def pipe_file(self, path, value, *args, **kwargs):
            if len(done) == dies_after:
                raise ConnectionError("the writer died")
            done.append(path)
            return put(self, path, value, *args, **kwargs)

        monkeypatch.setattr(type(fs), "pipe_file", pipe_file)
        with pytest.raises(ConnectionError):
            checkpoint.save(d, 2, _state(2), keep=3)
        monkeypatch.setattr(type(fs), "pipe_file", put)
        assert [p.rsplit("/", 1)[1] for p in done] == ["params.safetensors", "state.pt"][:dies_after]
        assert checkpoint.list_steps(d) == [1] and checkpoint.load_latest(d)[0] == 1
    fs.rm(f"/{d.removeprefix('memory://')}", recursive=True)
