"""`metascale validate` rejects impossible sharding combinations; `metascale run` of a sharded job is the one
training loop with rank-group workers: it trains, writes the coordinator's checkpoints (the same format as every job),
checkpoints and exits 0 on SIGTERM, resumes the same W&B run, resumes on another number of groups and ranks, and
`metascale eval` (also `--checkpoint FILE`) gives the run's own final figure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metascale.cluster import checkpoint
from metascale.config import parse_spec
from metascale.errors import SpecError

pytest.importorskip("deepspeed")
VIT = {"name": "vit", "dim": 32, "depth": 2, "heads": 2}
DATA = {"source": "synthetic", "ways": 3, "shots": 2, "queries": 2}


def metascale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metascale", *args], capture_output=True, text=True, timeout=600)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "algorithm,sharding,field,instead",
    [
        ("fomaml", {"precision": "fp16"}, "precision fp16", "use precision: bf16"),
        ("fomaml", {"offload": "cpu"}, "offload cpu", "zero_stage >= 1"),
        ("maml", {"support_backprop_subset": 2}, "sharding.support_backprop_subset", "use algorithm fomaml"),
        ("fomaml", {"support_backprop_subset": 7}, "sharding.support_backprop_subset (7)", "support set (6"),
        ("fomaml", {"support_backprop_subset": 2, "model": "custom"}, "model 'custom' may use", "use model vit"),
        ("protonet", {}, "sharding.engine deepspeed", "use sharding.engine: none"),
        (
            "fomaml",
            {"inner": {"query_chunk": 2}},
            "algorithm.inner.query_chunk",
            "drop query_chunk",
        ),  # engine's own pass
        ("maml", {"inner": {"checkpoint": "all"}}, "un-sharded knobs", "sharding.activation_checkpointing"),
        ("maml", {"inner": {"autocast": "bf16"}}, "un-sharded knobs", "sharding.precision"),
        ("maml", {"executor": "vmap"}, "executor.strategy", "auto or per_task"),  # tasks go to the ranks one at a time
    ],
)
def test_validate_rejects_impossible_combinations(algorithm, sharding, field, instead):
    model = VIT
    if sharding.pop("model", None) == "custom":  # a module metascale cannot inspect before building it
        model = {"name": "custom", "target": "torch.nn:Flatten", "feature_dim": 144}
    inner = {"differentiation": "mixed"} if algorithm == "maml" else {}
    spec = {
        "model": model,
        "data": DATA,
        "algorithm": {"name": algorithm, "inner": {**inner, **sharding.pop("inner", {})}},
        "executor": {"strategy": sharding.pop("executor", "auto")},
        "sharding": {"engine": "deepspeed", "ranks": 2, **sharding},
    }
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert field in str(e.value) and instead in str(e.value)


def test_sharded_jobs_take_any_number_of_groups_any_address_and_every_nonfinite_policy():
    base = {
        "model": VIT,
        "data": DATA,
        "algorithm": {"name": "maml"},
        "outer": {"meta_batch": 5},
        "sharding": {"engine": "deepspeed", "ranks": 2, "zero_stage": 2},
    }
    for cluster in ({"workers": 3}, {"address": "auto", "workers": 4}, {"address": "ray://head:10001"}):
        parse_spec({**base, "cluster": cluster, "executor": {"nonfinite": "skip_step"}})
    for name in ("maml", "metasgd", "anil", "learned_hparams", "learned_loss"):  # second order, mixed where it applies
        mixed = {"differentiation": "mixed"} if name != "anil" else {}
        for zero in (0, 1, 2, 3):
            parse_spec(
                {
                    **base,
                    "algorithm": {"name": name, "inner": mixed},
                    "sharding": {**base["sharding"], "zero_stage": zero, "precision": "bf16"},
                }
            )
    # the second-order learners run the algorithm's own query pass and inner loop, chunked and strided as asked
    parse_spec(
        {
            **base,
            "algorithm": {
                "name": "metasgd",
                "inner": {"differentiation": "mixed", "mixed_stride": 2, "query_chunk": 2, "steps": 3},
            },
        }
    )
    with pytest.raises(SpecError, match="rank groups as Ray actors"):
        parse_spec({**base, "cluster": {"address": "inline"}})


@pytest.mark.parametrize(
    "algorithm,sharding,field,instead",
    [
        ({"inner": {"differentiation": "mixed"}}, {"precision": "fp16"}, "precision fp16", "use precision: bf16"),
        ({"name": "fomaml", "inner": {"query_chunk": 2}}, {}, "algorithm.inner.query_chunk", "drop query_chunk"),
    ],
)
def test_validate_cli_prints_the_reason_without_a_traceback(tmp_path, algorithm, sharding, field, instead):
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": VIT,
                "data": DATA,
                "algorithm": algorithm,
                "sharding": {"engine": "deepspeed", "zero_stage": 2, **sharding},
            }
        )
    )
    out = metascale("validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert field in out.stderr + out.stdout and instead in out.stderr + out.stdout


CUSTOM = "{name: custom, target: 'torch.nn:Flatten', feature_dim: 144}"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["algorithm.name=anil"], "not 'anil'"),  # ANIL: reverse mode only, sharded or not
        (["algorithm.inner.first_order=true"], "not 'maml' with inner.first_order true"),
        (["algorithm.inner.checkpoint=steps"], "'mixed' keeps none"),
        (["sharding.support_backprop_subset=2"], "use algorithm fomaml or reptile"),  # LITE is first order
        (["algorithm.inner.differentiation=reverse", "algorithm.inner.support_chunk=2"], "needs inner.differentiation"),
        (["model={name: darts}", "algorithm.inner.support_chunk=2"], "not 'darts' (its batch norm"),
        ([f"model={CUSTOM}", "algorithm.inner.support_chunk=2"], "metascale cannot tell before building it"),
    ],
    ids=["anil", "first-order", "checkpoint-steps", "lite", "support-chunk-reverse", "support-chunk-bn", "custom"],
)
def test_run_refuses_sharded_mixed_mode_misfits_with_one_error(tmp_path, overrides, needle):
    """`metascale run` of a valid sharded mixed-mode job, made impossible by `--set`: exit 2 with the one problem
    under the error heading, before anything starts (no checkpoint directory)."""
    spec = {
        "model": VIT,
        "data": DATA,
        "algorithm": {"name": "maml", "inner": {"differentiation": "mixed", "steps": 1}},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "logging": {"wandb": {"mode": "disabled"}},
        "sharding": {"engine": "deepspeed", "ranks": 2, "zero_stage": 3},
    }
    parse_spec(spec)  # the job itself is fine: each refusal is the override's
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = metascale("run", str(path), *(a for o in overrides for a in ("--set", o)))
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 2 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert lines[1].startswith("  ") and needle in lines[1], out.stderr
    assert not (tmp_path / "ckpt").exists()


def _spec_file(tmp_path: Path, **over) -> Path:
    spec = {
        "name": "vit-zero3",
        "model": VIT,
        "data": DATA,
        "algorithm": {"name": "fomaml", "inner": {"steps": 1, "lr": 0.1}},
        "outer": {"meta_batch": 4, "steps": 400},
        "eval": {"every": 0, "final_episodes": 4},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 0},
        "logging": {"wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}, "progress": False},
        "cluster": {"workers": 2, "cpus_per_process": 0.5},
        "sharding": {
            "engine": "deepspeed",
            "zero_stage": 3,
            "ranks": 2,
            "activation_checkpointing": True,
            "support_backprop_subset": 4,
        },
        **over,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sigterm_checkpoints_then_resume_on_other_shapes_and_eval_read_the_coordinators_checkpoint(tmp_path):
    """Preemption (SIGTERM to the driver): it checkpoints after the current step and exits 0. --resume continues the
    same W&B run, with 1 group of 2 ranks instead of 2 groups; then with 2 groups of 1 rank; eval reads the
    checkpoint. (With embedded Ray, Ray's own processes share the driver's process group: a SIGTERM to the whole
    group stops them as well; docs/distributed.md.)"""
    path = _spec_file(tmp_path)
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metascale", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:  # wait until meta-steps are running
        lines.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = last_json(out)
    step = stopped["step"]
    assert stopped["status"] == "stopped" and 0 < step < 400
    found = checkpoint.load_latest(str(ckpt))
    assert found[0] == step and sorted(p.name for p in ckpt.iterdir()) == [f"step-{step:08d}"]

    again = metascale("run", str(path), "--resume", "--set", f"outer.steps={step + 1}", "--set", "cluster.workers=1")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = last_json(again.stdout)
    assert resumed["step"] == step + 1 and resumed["wandb_run_id"] == found[1]["wandb_run_id"]
    once_more = metascale(
        "run",
        str(path),
        "--resume",
        "--set",
        f"outer.steps={step + 2}",
        "--set",
        "sharding.ranks=1",
        "--set",
        "sharding.support_backprop_subset=null",
    )
    assert once_more.returncode == 0, once_more.stderr[-3000:]
    finished = last_json(once_more.stdout)
    assert finished["step"] == step + 2

    evaluated = metascale(
        "eval",
        str(path),
        "--checkpoint",
        str(ckpt / f"step-{step + 2:08d}"),
        "--set",
        "sharding.ranks=1",
        "--set",
        "sharding.support_backprop_subset=null",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = last_json(evaluated.stdout)
    assert result["checkpoint_step"] == step + 2 and result["test/episodes"] == 4
    assert result["test/accuracy"] == finished["final/accuracy"]  # same episodes, same meta-parameters
