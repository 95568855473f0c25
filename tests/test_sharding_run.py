"""`metascale validate` rejects impossible sharding combinations; `metascale run` trains FOMAML on a small ViT with
ZeRO-3 over 2 ranks (gloo), LITE and activation checkpointing, writes one checkpoint shard per rank, and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metascale.cluster import checkpoint
from metascale.config import parse_spec
from metascale.errors import SpecError

pytest.importorskip("deepspeed")
VIT = {"name": "vit", "dim": 32, "depth": 2, "heads": 2}
DATA = {"source": "synthetic", "ways": 3, "shots": 2, "queries": 2}


def metascale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metascale", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("algorithm,sharding,field,instead", [
    ("maml", {"zero_stage": 3}, "sharding.zero_stage", "use zero_stage <= 2"),
    ("fomaml", {"precision": "fp16"}, "precision fp16", "use precision: bf16"),
    ("fomaml", {"offload": "cpu"}, "offload cpu", "zero_stage >= 1"),
    ("maml", {"support_backprop_subset": 2}, "sharding.support_backprop_subset", "use algorithm fomaml"),
    ("fomaml", {"support_backprop_subset": 7}, "sharding.support_backprop_subset (7)", "support set (6"),
    ("protonet", {}, "sharding.engine deepspeed", "use sharding.engine: none"),
])
def test_validate_rejects_impossible_combinations(tmp_path, algorithm, sharding, field, instead):
    spec = {"model": VIT, "data": DATA, "algorithm": {"name": algorithm},
            "sharding": {"engine": "deepspeed", "ranks": 2, **sharding}}
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert field in str(e.value) and instead in str(e.value)


def test_validate_cli_prints_the_reason_without_a_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": VIT, "data": DATA, "sharding": {"engine": "deepspeed", "zero_stage": 3}}))
    out = metascale("validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sharding.zero_stage 3 cannot run second-order 'maml'" in out.stderr + out.stdout


def test_run_zero3_fomaml_two_ranks_and_resume(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    spec = {"name": "vit-zero3", "model": VIT, "data": DATA,
            "algorithm": {"name": "fomaml", "inner": {"steps": 1, "lr": 0.1}},
            "outer": {"meta_batch": 2, "steps": 2}, "eval": {"every": 0, "final_episodes": 4},
            "checkpoint": {"dir": str(ckpt), "every": 1}, "logging": {"wandb": {"mode": "disabled"}},
            "sharding": {"engine": "deepspeed", "zero_stage": 3, "ranks": 2, "activation_checkpointing": True,
                         "support_backprop_subset": 4}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = metascale("run", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["status"] == "finished" and result["step"] == 2 and result["final/episodes"] == 4
    assert sorted(p.name for p in (ckpt / "rank-1-of-2").iterdir()) == ["step-00000001.ckpt", "step-00000002.ckpt"]
    again = metascale("run", str(path), "--resume", "--set", "outer.steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 3


def test_sigterm_to_the_group_checkpoints_then_resume_and_eval_read_the_shards(tmp_path: Path):
    """Preemption as Kubernetes or Slurm does it (SIGTERM to the whole process group): the ranks ignore it, the
    driver has them write their shards and exits 0; --resume continues the same W&B run; eval reads the shards."""
    ckpt = tmp_path / "ckpt"
    spec = {"name": "vit-term", "model": VIT, "data": DATA,
            "algorithm": {"name": "fomaml", "inner": {"steps": 1, "lr": 0.1}},
            "outer": {"meta_batch": 2, "steps": 400}, "eval": {"every": 0, "final_episodes": 4},
            "checkpoint": {"dir": str(ckpt), "every": 0},
            "logging": {"wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}, "progress": False},
            "sharding": {"engine": "deepspeed", "zero_stage": 3, "ranks": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "metascale", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # wait until meta-steps are running
        lines.append(line)
        if line.startswith("step "):
            break
    os.killpg(proc.pid, signal.SIGTERM)  # our own new session: only this test's processes
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    step = stopped["step"]
    assert stopped["status"] == "stopped" and 0 < step < 400
    shards = [checkpoint.load_latest(str(ckpt / f"rank-{r}-of-2")) for r in range(2)]
    assert [s[0] for s in shards] == [step, step]
    again = metascale("run", str(path), "--resume", "--set", f"outer.steps={step + 1}")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert resumed["step"] == step + 1 and resumed["wandb_run_id"] == shards[0][1]["wandb_run_id"]
    evaluated = metascale("eval", str(path))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["checkpoint_step"] == step + 1 and result["test/episodes"] == 4
    assert result["test/accuracy"] == resumed["final/accuracy"]  # same episodes, same meta-parameters


def test_validate_refuses_skip_step_for_second_order_sharding():
    spec = {"model": VIT, "data": DATA, "algorithm": {"name": "maml"}, "executor": {"nonfinite": "skip_step"},
            "outer": {"meta_batch": 4},
            "sharding": {"engine": "deepspeed", "ranks": 2, "zero_stage": 2}}
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert "executor.nonfinite skip_step" in str(e.value) and "use skip_task or stop" in str(e.value)
    parse_spec({**spec, "algorithm": {"name": "fomaml"}})  # first order honours it


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_second_order_resume_equals_an_uninterrupted_run(tmp_path: Path, zero_stage):
    """MAML with Adam through the engine: 2 steps, then --resume to 3, ends where 3 steps in one go end (the
    ZeRO-partitioned fp32 master weights and Adam state are in each rank's shard)."""
    def spec(name: str, steps: int) -> Path:
        s = {"name": name, "model": VIT, "data": DATA, "algorithm": {"name": "maml", "inner": {"steps": 1, "lr": 0.1}},
             "outer": {"meta_batch": 2, "steps": steps, "lr": 0.01}, "eval": {"every": 0, "final_episodes": 2},
             "checkpoint": {"dir": str(tmp_path / name), "every": 1}, "logging": {"wandb": {"mode": "disabled"}},
             "sharding": {"engine": "deepspeed", "zero_stage": zero_stage, "ranks": 2}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(s))
        return path

    whole, cut = spec("whole", 3), spec("cut", 2)
    for args in (["run", str(whole)], ["run", str(cut)], ["run", str(cut), "--resume", "--set", "outer.steps=3"]):
        out = metascale(*args)
        assert out.returncode == 0, out.stderr[-3000:]
    for rank in range(2):
        a = checkpoint.load_latest(str(tmp_path / "whole" / f"rank-{rank}-of-2"))
        b = checkpoint.load_latest(str(tmp_path / "cut" / f"rank-{rank}-of-2"))
        assert a[0] == b[0] == 3
        for k, p in a[1]["params"].items():
            assert torch.allclose(p, b[1]["params"][k], rtol=0, atol=1e-7), k
