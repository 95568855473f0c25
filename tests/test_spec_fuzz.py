"""Fuzzing the spec loader and `--set`: whatever the file or the override holds, load_spec ends in a JobSpec or in a
SpecError (exit code 2) of one-line problems, never in another exception. Bounded: a fixed number of examples per
test, derandomized so CI runs the same inputs every time (raise FUZZ_EXAMPLES to search longer)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metascale.config import JobSpec, dump_spec, load_spec, parse_spec
from metascale.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: p.read_bytes() for p in sorted((REPO / "jobs").glob("*.yaml"))}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Field names and dotted paths of real sections, so generated documents get past "unknown field" into the validators.
SECTIONS = [
    "name",
    "seed",
    "model",
    "data",
    "algorithm",
    "outer",
    "eval",
    "checkpoint",
    "logging",
    "executor",
    "cluster",
    "sharding",
]
FIELDS = [
    "name",
    "source",
    "steps",
    "lr",
    "inner",
    "ways",
    "shots",
    "queries",
    "amplitude",
    "hidden",
    "meta_batch",
    "schedule",
    "decay",
    "decay_steps",
    "workers",
    "engine",
    "zero_stage",
    "ranks",
    "stream",
    "window_shards",
    "es",
    "sigma",
    "mode",
    "wandb",
    "dir",
    "every",
    "gpus_per_process",
    "image_size",
    "patch_size",
    "augment",
]
PATHS = [
    "outer.lr",
    "outer.steps",
    "outer.schedule.decay",
    "algorithm.name",
    "algorithm.inner.lr",
    "data.source",
    "data.ways",
    "data.amplitude",
    "model.name",
    "model.hidden",
    "cluster.workers",
    "cluster.address",
    "sharding.engine",
    "sharding.zero_stage",
    "logging.wandb.mode",
    "eval.every",
    "name",
    "seed",
    "checkpoint.dir",
    "logging.wandb.dir",
]
# Characters YAML gives meaning to, plus tab, NUL, escapes, non-ASCII text and a Unicode line separator.
YAML_TEXT = st.text(
    alphabet=st.sampled_from(list(":-[]{},&*!|>'\"#%@?`\t\n .=\\0123456789aefinsux~\x00é\u2028")), max_size=40
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**50), max_value=10**50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(SECTIONS + FIELDS),
    st.sampled_from(["runs/{name}", "runs/{{x}}", "{", "}", "{0}", "{nam}", "{name.x}"]),  # path templates
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(SECTIONS + FIELDS), st.text(max_size=8), st.integers()), children, max_size=5
        ),
    ),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def spec_file():
    with tempfile.TemporaryDirectory(prefix="spec-fuzz-") as d:
        yield Path(d) / "job.yaml"


def _outcome(path: Path, overrides: list[str] = ()) -> JobSpec | SpecError:
    """load_spec's result; fails the test on any exception other than a well-formed SpecError."""
    try:
        spec = load_spec(path, list(overrides))
    except SpecError as e:
        assert e.exit_code == 2 and e.problems
        for problem in e.problems:
            assert "\n" not in problem and "\r" not in problem, problem
            assert "Traceback (most recent call last)" not in problem and len(problem) < 2000, problem
        return e
    # What `validate` prints and `submit` sends must load back as the same job, and its path templates must expand.
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec
    spec.path(spec.checkpoint.dir), spec.path(spec.logging.wandb.dir)
    return spec


def _mutate(data: st.DataObject, text: bytes) -> bytes:
    """A few random edits: delete a span, insert YAML-ish text or raw bytes, duplicate or drop a line."""
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        edit = data.draw(st.sampled_from(["delete", "insert", "bytes", "dup_line", "drop_line"]), label="edit")
        if edit == "delete":
            text = text[:at] + text[at + data.draw(st.integers(1, 20), label="n") :]
        elif edit == "insert":
            text = text[:at] + data.draw(YAML_TEXT, label="ins").encode() + text[at:]
        elif edit == "bytes":
            text = text[:at] + data.draw(st.binary(min_size=1, max_size=4), label="raw") + text[at:]
        else:
            lines = text.splitlines(keepends=True) or [b""]
            i = data.draw(st.integers(0, len(lines) - 1), label="line")
            lines[i : i + 1] = [lines[i], lines[i]] if edit == "dup_line" else []
            text = b"".join(lines)
    return text


@FUZZ
@given(data=st.data())
def test_mutated_example_specs_load_or_fail_cleanly(spec_file, data):
    name = data.draw(st.sampled_from(sorted(EXAMPLES)), label="example")
    spec_file.write_bytes(_mutate(data, EXAMPLES[name]))
    _outcome(spec_file)


@FUZZ
@given(doc=documents)
def test_random_yaml_documents_load_or_fail_cleanly(spec_file, doc):
    spec_file.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _outcome(spec_file)


@FUZZ
@given(sections=st.dictionaries(st.sampled_from(SECTIONS), documents, max_size=4))
def test_random_sections_load_or_fail_cleanly(spec_file, sections):
    spec_file.write_text(yaml.safe_dump(sections, allow_unicode=True))
    _outcome(spec_file)


@FUZZ
@given(text=YAML_TEXT)
def test_random_text_loads_or_fails_cleanly(spec_file, text):
    spec_file.write_bytes(text.encode())
    _outcome(spec_file)


overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PATHS), YAML_TEXT),
    st.builds(
        lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", st.sampled_from(PATHS), documents
    ),
    st.text(max_size=30),  # anything at all: no '=', empty key, dots only
)


@FUZZ
@given(example=st.sampled_from(sorted(EXAMPLES)), sets=st.lists(overrides, min_size=1, max_size=4))
def test_random_overrides_load_or_fail_cleanly(spec_file, example, sets):
    spec_file.write_bytes(EXAMPLES[example])
    _outcome(spec_file, sets)
