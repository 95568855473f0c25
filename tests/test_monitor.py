"""The W&B side of a run, without Ray: the mode `auto` resolves from the environment, the run carries the spec's
group, tags, notes and job type and the job's ID, and checkpoints (files or directories) become `model` artifacts
with `latest` and `best` as `logging.wandb.log_checkpoints` says, read back from the offline run file."""

from __future__ import annotations

import pytest

from metascale.config import parse_spec
from metascale.monitor import Monitor, resolve_mode, score
from wandb_records import artifacts, find_run_files, run_files, run_info, settled


@pytest.mark.parametrize(
    "mode, env, expected",
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, "online"),
        ("auto", {"WANDB_API_KEY": ""}, "offline"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun", "WANDB_API_KEY": "k"}, "offline"),
        ("offline", {"WANDB_API_KEY": "k"}, "offline"),
        ("online", {}, "online"),
        ("disabled", {"WANDB_API_KEY": "k"}, "disabled"),
    ],
)
def test_mode_auto_is_online_only_with_a_key(mode, env, expected):
    assert resolve_mode(mode, env) == expected


def test_the_default_mode_is_auto_and_the_tests_run_offline():
    import os

    assert parse_spec({}).logging.wandb.mode == "auto"
    assert "WANDB_API_KEY" not in os.environ and resolve_mode("auto") == "offline"


def test_score_is_accuracy_or_minus_the_loss():
    assert score({"eval/accuracy": 0.75, "eval/loss": 0.3}, "eval") == ("eval/accuracy", 0.75)
    assert score({"final/loss": 0.25}, "final") == ("final/loss", -0.25)
    assert score({"eval/loss": float("nan")}, "eval") is None
    assert score({"train/loss": 0.1}, "eval") is None


def _spec(tmp_path, **wandb):
    return parse_spec(
        {
            "name": "mon",
            "outer": {"steps": 6},
            "logging": {"wandb": {"mode": "offline", "dir": str(tmp_path / "wb"), **wandb}, "progress": False},
        }
    )


def _checkpoint(tmp_path, step, as_dir=False):
    if as_dir:  # the per-step directory layout: tensors + a JSON manifest
        d = tmp_path / "ckpt" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 16)
        (d / "manifest.json").write_text('{"step": %d}' % step)
        return str(d)
    f = tmp_path / "ckpt" / f"step-{step:08d}.ckpt"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"\1" * 16)
    return str(f)


def _run(tmp_path, evals, final, as_dir=False, **wandb):
    """Steps 1-6 with a checkpoint every 2 steps, held-out metrics at the steps of `evals`, the final evaluation
    `final`; returns the artifact versions the offline run file holds."""
    monitor = Monitor(_spec(tmp_path, **wandb), None, 0)
    for step in range(1, 7):
        monitor.step(step, {"train/loss": 1.0 / step, **evals.get(step, {})})
        if step % 2 == 0:
            monitor.artifact(_checkpoint(tmp_path, step, as_dir), step)
    monitor.summary(final)
    monitor.close()
    [run_file] = run_files(tmp_path / "wb")
    return artifacts(settled(run_file))


def _versions(arts):
    assert all(a["type"] == "model" and a["name"] == arts[0]["name"] for a in arts)
    return [(a["metadata"]["step"], sorted(a["aliases"])) for a in arts]


def test_final_uploads_the_last_checkpoint_once_scored_by_the_final_evaluation(tmp_path, capsys):
    arts = _run(tmp_path, {2: {"eval/accuracy": 0.9}}, {"final/accuracy": 0.6, "final/episodes": 12})
    assert _versions(arts) == [(6, ["best", "latest"])]
    assert arts[0]["metadata"]["metric"] == "final/accuracy" and arts[0]["metadata"]["score"] == 0.6
    assert arts[0]["files"] == ["step-00000006.ckpt"]
    err = capsys.readouterr().err
    assert "wandb sync " in err and "offline-run-" in err


def test_all_uploads_every_checkpoint_and_best_follows_the_held_out_accuracy(tmp_path):
    evals = {2: {"eval/accuracy": 0.5}, 3: {"eval/accuracy": 0.9}, 4: {"eval/accuracy": 0.7}}
    arts = _run(tmp_path, evals, {"final/accuracy": 0.8}, log_checkpoints="all")
    # step 3's 0.9 scores no checkpoint (none was written at step 3); step 6 is scored by the final evaluation
    assert _versions(arts) == [(2, ["best", "latest"]), (4, ["best", "latest"]), (6, ["best", "latest"])]
    arts = _run(
        tmp_path / "b",
        {2: {"eval/accuracy": 0.5}, 4: {"eval/accuracy": 0.4}},
        {"final/accuracy": 0.45},
        log_checkpoints="all",
    )
    assert _versions(arts) == [(2, ["best", "latest"]), (4, ["latest"]), (6, ["latest"])]


def test_regression_best_is_the_lowest_loss_and_checkpoint_directories_are_logged_whole(tmp_path):
    arts = _run(
        tmp_path,
        {2: {"eval/loss": 0.5}, 4: {"eval/loss": 0.2}},
        {"final/loss": 0.3},
        as_dir=True,
        log_checkpoints="all",
    )
    assert _versions(arts) == [(2, ["best", "latest"]), (4, ["best", "latest"]), (6, ["latest"])]
    assert sorted(arts[1]["files"]) == ["step-00000004/manifest.json", "step-00000004/model.safetensors"]


def test_none_uploads_nothing(tmp_path):
    assert _run(tmp_path, {}, {"final/accuracy": 0.5}, log_checkpoints="none") == []


def test_the_run_carries_group_tags_notes_job_type_and_the_job_id(tmp_path, monkeypatch):
    monkeypatch.setenv("METASCALE_JOB_ID", "mon-abc123")
    monitor = Monitor(_spec(tmp_path, group="ablation-1", tags=["maml", "cpu"], notes="why", job_type="sweep"), None, 0)
    monitor.close()
    [run_file] = find_run_files(tmp_path / "wb")
    info = run_info(settled(run_file))
    assert (info["group"], info["tags"], info["notes"], info["job_type"]) == (
        "ablation-1",
        ["maml", "cpu"],
        "why",
        "sweep",
    )
    meta = info["config"]["metascale"]
    assert meta["job_id"] == "mon-abc123" and meta["cluster_address"] == "local" and meta["version"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tags": [""]}, "logging.wandb.tags.0"),
        ({"tags": ["x" * 65]}, "logging.wandb.tags.0"),
        ({"job_type": ""}, "logging.wandb.job_type"),
        ({"log_checkpoints": "best"}, "logging.wandb.log_checkpoints"),
        ({"mode": "on"}, "logging.wandb.mode"),
    ],
)
def test_bad_wandb_fields_name_the_field(bad, message):
    from metascale.errors import SpecError

    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        parse_spec({"logging": {"wandb": bad}})
