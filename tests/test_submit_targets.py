"""`--to` parsing, job IDs, the local job record, and that every example job becomes a valid RayJob."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from k8s_emulator import REPO, rule_violations, schema_errors

from metascale.errors import OptInError
from metascale.submit import state
from metascale.submit.package import prepare
from metascale.submit.rayjob import rayjob
from metascale.submit.targets import K8sTarget, RayTarget, TargetError, check_job_id, new_job_id, parse_target

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    "url, target",
    [
        ("http://127.0.0.1:8265", RayTarget("http://127.0.0.1:8265")),
        ("https://ray.example.com/", RayTarget("https://ray.example.com")),
        ("k8s://ml", K8sTarget("ml")),
        ("k8s://kind-dev/ml", K8sTarget("ml", "kind-dev")),
        ("k8s://arn:aws:eks:eu-west-1:123:cluster/prod/ml", K8sTarget("ml", "arn:aws:eks:eu-west-1:123:cluster/prod")),
    ],
)
def test_parse_target(url, target):
    assert parse_target(url) == target
    assert parse_target(target.url) == target


@pytest.mark.parametrize("url", ["ftp://x", "127.0.0.1:8265", "k8s://", "k8s://ctx/Bad_NS", "http://", "http://h?x=1"])
def test_bad_targets_are_rejected(url):
    with pytest.raises(TargetError, match=re.escape(repr(url))):
        parse_target(url)


@pytest.mark.parametrize("name", ["e2e", "Sinusoid.MAML_v2", "9lives", "x" * 63, "a.-_b"])
def test_job_ids_are_rayjob_names(name):
    ids = {new_job_id(name) for _ in range(20)}
    assert len(ids) == 20
    for job_id in ids:
        assert DNS1035.match(job_id) and len(job_id) <= 47, job_id
        assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("bad", ["", "UPPER-abc", "a;rm -rf /", "-x", "x" * 48, "../etc"])
def test_bad_job_ids_are_rejected_before_any_request(bad):
    with pytest.raises(TargetError, match="expected a metascale job ID"):
        check_job_id(bad)


def test_state_remembers_where_each_job_went(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("METASCALE_STATE_DIR", str(tmp_path))
    assert state.last_target() is None
    state.remember("a-111111", "http://127.0.0.1:8265", "a")
    state.remember("b-222222", "k8s://ml", "b")
    assert state.target_of("a-111111") == "http://127.0.0.1:8265" and state.last_target() == "k8s://ml"
    assert json.loads((tmp_path / "jobs.json").read_text())["jobs"]["b-222222"]["name"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.json"]  # no temp files left behind
    code, _, err = cli("status", "c-333333")
    assert code == 2 and "was not submitted from this machine: pass --to URL" in err


@pytest.mark.usefixtures("kuberay_crds")
@pytest.mark.parametrize("spec", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_makes_a_valid_rayjob(spec):
    job = prepare(spec)
    obj = rayjob(job, "ml")
    assert schema_errors(obj) == [] and rule_violations(obj) == []
    assert shlex.split(obj["spec"]["entrypoint"]) == [
        "metascale",
        "run",
        "/etc/metascale/metascale-job.yaml",
        "--auto-resume",
    ]
    assert obj["spec"]["backoffLimit"] == 2
    assert job.spec.cluster.address != "local"


def test_a_pipe_data_url_is_submitted_only_with_allow_pipe(tmp_path, monkeypatch, cli):
    """A pipe: URL is a command every worker would run: `submit` refuses it, before any request, unless opted in."""
    monkeypatch.setenv("METASCALE_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "piped.yaml"
    spec.write_text(
        "name: piped\nmodel: {name: conv4}\ndata: {source: shards, url: 'pipe:aws s3 cp s3://bucket/set/{name} -'}\n"
    )
    code, out, err = cli("submit", str(spec), "--to", "http://127.0.0.1:1", "--dry-run")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {spec}: data.url is a pipe: command") and "pass --allow-pipe" in err
    with pytest.raises(OptInError):
        prepare(spec)
    job = prepare(spec, allow_pipe=True)
    assert yaml.safe_load(job.spec_yaml)["data"]["url"] == "pipe:aws s3 cp s3://bucket/set/{name} -"
    # Opted in, the spec goes on to the cluster (here a port nothing listens on: the next error is the network's).
    code, _, err = cli("submit", str(spec), "--to", "http://127.0.0.1:1", "--allow-pipe")
    assert code == 1 and err.startswith("error: cannot reach the Ray cluster at http://127.0.0.1:1")
