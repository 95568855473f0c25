"""Job specs: defaults that run, and bad input that gives a field path, what was expected, exit code 2, no trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metascale.config import JobSpec, dump_spec, load_spec, parse_spec
from metascale.errors import SpecError
from metascale.extras import available

REPO = Path(__file__).resolve().parents[1]


def _problems(raw) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    return e.value.problems


def test_empty_spec_is_a_valid_sinusoid_maml_job():
    spec = parse_spec({})
    assert spec.algorithm.name == "maml" and spec.data.source == "sinusoid" and spec.model.name == "mlp"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"outer": {"meta_batch": 0}}, "outer.meta_batch: Input should be greater than 0 (got 0)"),
        ({"algorithm": {"inner": {"lr": "fast"}}}, "algorithm.inner.lr: Input should be a valid number"),
        ({"algorithm": {"name": "mamal"}}, "algorithm.name: Input should be 'maml', 'fomaml'"),
        ({"outer": {"stepz": 3}}, "outer.stepz: unknown field"),
        ({"model": {"name": "conv4", "hiden": 3}, "data": {"source": "synthetic"}}, "model.hiden: unknown field"),
        ({"data": {"source": "shards"}, "model": {"name": "conv4"}}, "data.url: Field required"),
        ({"model": {"name": "conv4"}}, "data.source 'sinusoid' needs model.name 'mlp'"),
        (
            {"model": {"name": "vit", "image_size": 28, "patch_size": 5}, "data": {"source": "synthetic"}},
            "image_size (28) must be a multiple of patch_size (5)",
        ),
        ({"name": "bad name; rm -rf /"}, "name: String should match pattern"),
        (
            {"outer": {"steps": 100, "schedule": {"decay": "cosine", "decay_steps": 200}}},
            "schedule.warmup_steps (0) + schedule.decay_steps (200) must fit in outer.steps (100)",
        ),
        ({"outer": {"schedule": {"decay_steps": 10}}}, "schedule.decay_steps (10) needs schedule.decay 'cosine'"),
        ({"outer": {"schedule": {"decay": "step"}}}, "outer.schedule.decay: Input should be 'none', 'cosine'"),
        ({"checkpoint": {"dir": "runs/{nam}"}}, "checkpoint.dir: {name} is the only placeholder"),
        ({"logging": {"wandb": {"dir": "runs/{"}}}, "logging.wandb.dir: {name} is the only placeholder"),
        (
            {"kubernetes": {"imagePullSecrets": [{"name": "Reg_Cred"}]}},
            "kubernetes.imagePullSecrets.0.name: String should match pattern",
        ),
        (
            {"kubernetes": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}},
            "volume type 'hostPath' is not allowed by the restricted Pod Security Standard",
        ),
        ({"kubernetes": {"volumes": [{"name": "v"}]}}, "volume 'v' needs exactly one of configMap"),
        (
            {
                "kubernetes": {
                    "volumes": [{"name": "v", "emptyDir": {}}],
                    "volumeMounts": [{"name": "w", "mountPath": "/w"}],
                }
            },
            "volumeMounts: 'w' names no volume",
        ),
        (
            {
                "kubernetes": {
                    "volumes": [{"name": "v", "emptyDir": {}}],
                    "volumeMounts": [{"name": "v", "mountPath": "/tmp"}],
                }
            },
            "overlaps metascale's own mounts",
        ),
        ({"kubernetes": {"volumeMounts": [{"name": "v", "mountPath": "relative"}]}}, "mountPath: String should match"),
        ({"kubernetes": {"nodeSelector": {"pool": "gpu nodes"}}}, "'gpu nodes' is not a Kubernetes label value"),
        ({"kubernetes": {"tolerations": [{"key": "k", "operator": "In"}]}}, "operator: Input should be 'Exists'"),
        ({"kubernetes": {"head": {"memory": "four gigs"}}}, "kubernetes.head.memory: String should match pattern"),
        ({"kubernetes": {"ttlSecondsAfterFinished": -1}}, "ttlSecondsAfterFinished: Input should be greater than"),
        ({"kubernetes": {"wandbSecret": "x"}}, "kubernetes.wandbSecret: unknown field"),
        (
            {"algorithm": {"name": "fomaml", "inner": {"differentiation": "mixed"}}},
            "inner.differentiation 'mixed' computes exact second-order meta-gradients through the whole model",
        ),
        (
            {"algorithm": {"inner": {"differentiation": "mixed", "first_order": True}}},
            "not 'maml' with inner.first_order",
        ),
        (
            {"algorithm": {"inner": {"differentiation": "mixed", "checkpoint": "steps"}}},
            "inner.checkpoint 'steps' recomputes reverse mode's graph of each inner step",
        ),
        (
            {"algorithm": {"inner": {"differentiation": "forward"}}},
            "differentiation: Input should be 'reverse' or 'mixed'",
        ),
        ({"algorithm": {"inner": {"mixed_stride": 3}}}, "inner.mixed_stride recomputes mixed mode's stored weights"),
        (
            {"algorithm": {"inner": {"differentiation": "mixed", "mixed_stride": 0}}},
            "mixed_stride: Input should be greater than 0",
        ),
        ({"algorithm": {"inner": {"support_chunk": 2}}}, "inner.support_chunk splits mixed mode's support products"),
        (
            {"algorithm": {"inner": {"mixed_blocks": False}}},
            "inner.mixed_blocks false runs mixed mode's support products over the whole model",
        ),
        (
            {
                "model": {"name": "resnet12"},
                "data": {"source": "synthetic"},
                "algorithm": {"inner": {"differentiation": "mixed", "support_chunk": 2, "mixed_blocks": False}},
            },
            "inner.support_chunk on model 'resnet12' chunks each block with its batch statistics made explicit",
        ),
        (
            {
                "model": {"name": "darts"},
                "data": {"source": "synthetic"},
                "algorithm": {"inner": {"differentiation": "mixed", "support_chunk": 2}},
            },
            "inside the model's blocks: models mlp, vit, conv4, resnet12, not 'darts' (its batch norm couples",
        ),
        (
            {"algorithm": {"inner": {"differentiation": "mixed", "support_chunk": 0}}},
            "support_chunk: Input should be greater than 0",
        ),
        (
            {"cluster": {"cpus_per_process": 2}, "kubernetes": {"worker": {"cpu": "1500m", "memory": "1Gi"}}},
            "kubernetes.worker.cpu (1500m) is below what a worker pod's processes need (cluster.cpus_per_process x 1 = 2)",
        ),
    ],
)
def test_bad_fields_name_their_path_and_what_was_expected(raw, expected):
    assert any(expected in p for p in _problems(raw)), _problems(raw)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_mixed_mode_validates_sharded_at_every_zero_stage(zero_stage):
    """Stages 0-2 run mixed mode's sweep as the backward of engine.backward, stage 3 on gathered whole tensors."""
    spec = parse_spec(
        {
            "model": {"name": "vit"},
            "data": {"source": "synthetic"},
            "cluster": {"address": "local"},
            "algorithm": {"name": "metasgd", "inner": {"differentiation": "mixed"}},
            "sharding": {"engine": "deepspeed", "zero_stage": zero_stage},
        }
    )
    assert spec.algorithm.inner.differentiation == "mixed" and spec.sharding.zero_stage == zero_stage


@pytest.mark.parametrize("model", ["mlp", "vit", "conv4", "resnet12"])
def test_support_chunks_validate_where_only_block_batch_norm_couples_examples(model):
    data = {"source": "sinusoid" if model == "mlp" else "synthetic"}
    spec = parse_spec(
        {
            "model": {"name": model},
            "data": data,
            "algorithm": {"name": "learned_hparams", "inner": {"differentiation": "mixed", "support_chunk": 3}},
        }
    )
    assert spec.algorithm.inner.support_chunk == 3


def test_the_kubernetes_section_defaults_to_the_former_rayjob():
    k = parse_spec({}).kubernetes
    assert (k.image, k.head.cpu, k.head.memory, k.worker.cpu, k.worker.memory) == (
        "metascale:0.1.0",
        "1",
        "4Gi",
        None,
        "8Gi",
    )
    assert (k.ttlSecondsAfterFinished, k.backoffLimit, k.wandb_secret) == (3600, 2, "metascale-wandb")
    assert not (k.volumes or k.volumeMounts or k.tolerations or k.nodeSelector or k.imagePullSecrets)


def test_overrides_apply_dotted_keys_with_yaml_values(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nouter: {steps: 5}\n")
    spec = load_spec(path, ["outer.steps=7", "algorithm.inner.first_order=true", "cluster.address=inline"])
    assert spec.outer.steps == 7 and spec.algorithm.inner.first_order and spec.cluster.address == "inline"


EXAMPLE_JOBS = sorted((REPO / "jobs").glob("*.yaml"))
NEEDS_EXTRA = {"halfcheetah-dir-maml-rl.yaml": "mujoco"}  # jobs whose data source needs an optional extra


def test_there_are_example_jobs():
    assert EXAMPLE_JOBS


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=lambda p: p.name)
def test_every_example_job_validates(job):
    module = NEEDS_EXTRA.get(job.name)
    if module is not None and not available(module):
        pytest.skip(
            f"{job.name} needs {module}, which is not installed (its refusal is tested in test_survey_halfcheetah.py)"
        )
    assert isinstance(load_spec(job), JobSpec), job


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "metascale", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "content, needle",
    [
        ("outer: {meta_batch: -1}\n", "outer.meta_batch"),
        ("outer: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_cli_validate_reports_bad_specs_with_exit_2_and_no_traceback(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    for verb in ("validate", "run"):
        r = _cli(verb, str(path))
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_file_and_bad_override_are_clear(tmp_path):
    r = _cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr
    good = tmp_path / "ok.yaml"
    good.write_text("name: ok\n")
    r = _cli("validate", str(good), "--set", "outer.steps")
    assert r.returncode == 2 and "expected dotted.key=value" in r.stderr


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"outer": {"lr": float("inf")}}, "outer.lr: Input should be a finite number (got inf)"),
        ({"algorithm": {"inner": {"lr": float("nan")}}}, "algorithm.inner.lr: Input should be a finite number"),
        (
            {"data": {"source": "sinusoid", "amplitude": [float("nan"), 1.0]}},
            "data.amplitude.0: Input should be a finite number (got nan)",
        ),
        ({"cluster": {"gpus_per_process": float("inf")}}, "cluster.gpus_per_process: Input should be a finite number"),
        ({"outer": {"es": {"sigma": float("-inf")}}}, "outer.es.sigma: Input should be a finite number (got -inf)"),
        (
            {"outer": {"schedule": {"final_ratio": float("nan")}}},
            "outer.schedule.final_ratio: Input should be a finite number",
        ),
        (
            {"model": {"name": "vit", "mlp_ratio": float("inf")}, "data": {"source": "synthetic"}},
            "model.mlp_ratio: Input should be a finite number",
        ),
    ],
)
def test_nan_and_infinity_are_refused_with_the_field_path(raw, expected):
    assert any(expected in p for p in _problems(raw)), _problems(raw)


def _one_error(r: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2 and one `error:` message: a heading and its indented problem lines, no trace, nothing else."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr) < 1000, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: ") and all(ln.startswith("  ") for ln in lines[1:]), r.stderr
    assert needle in r.stderr, r.stderr


# A YAML "billion laughs": six levels of ten aliases make a million-element list out of 200 bytes.
LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip("abcde", "bcdef"))
    + "name: *f\n"
)


@pytest.mark.parametrize(
    "content, needle",
    [
        (bytes(range(128, 256)), "byte 0: not UTF-8 text"),
        (b"name: a\x00b\n", "line 1, column 8: not valid YAML (unacceptable character #x0000"),
        (b"seed: 2020-13-45\n", "line 1, column 7: not valid YAML ('2020-13-45' is not a valid timestamp"),
        (b"seed: " + b"7" * 5000 + b"\n", "is not a valid int"),
        (b"seed: !!bool maybe\n", "'maybe' is not a valid bool"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (LAUGHS.encode(), "name: Input should be a valid string (got [[["),
        (b"outer: {lr: .inf}\n", "outer.lr: Input should be a finite number (got inf)"),
    ],
    ids=["binary", "nul", "bad-date", "5000-digits", "bad-bool", "deep", "billion-laughs", "inf"],
)
def test_cli_unreadable_spec_contents_are_one_error(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    _one_error(_cli("validate", str(path)), needle)


def test_cli_spec_paths_that_are_not_files_are_one_error(tmp_path):
    _one_error(_cli("validate", str(tmp_path)), "is a directory, not a YAML file")
    _one_error(_cli("validate", "/dev/zero"), "larger than 1024 KiB: not a job spec")  # never read whole


@pytest.mark.parametrize(
    "override, needle",
    [
        ("outer.lr=[1,", "override 'outer.lr=[1,': line 1, column 4: not valid YAML (expected the node content"),
        ("outer.lr=!!python/object:os.system x", "could not determine a constructor for the tag"),
        ("outer.lr=.nan", "outer.lr: Input should be a finite number (got nan)"),
        ("seed=\t1", "line 1, column 1: not valid YAML (found character '\\t' that cannot start any token)"),
        ("checkpoint.dir=runs/{nam}", "checkpoint.dir: {name} is the only placeholder, and a literal brace is"),
    ],
)
def test_cli_malformed_overrides_are_one_error(tmp_path, override, needle):
    good = tmp_path / "ok.yaml"
    good.write_text("name: ok\n")
    _one_error(_cli("validate", str(good), "--set", override), needle)


def test_cli_validate_prints_the_full_spec(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\n")
    r = _cli("validate", str(path))
    assert r.returncode == 0
    assert parse_spec(__import__("yaml").safe_load(r.stdout)).name == "ok"


@pytest.mark.parametrize("layout", ["classes", "samples"])
def test_a_dumped_shards_spec_loads_again(layout):
    """submit packages the spec as dumped YAML, every default written out: the shards layout rules must judge values,
    not which fields were written."""
    import yaml

    spec = parse_spec({"model": {"name": "conv4"}, "data": {"source": "shards", "url": "data/set", "layout": layout}})
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec
