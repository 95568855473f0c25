"""YAML in, JobSpec out: any problem becomes a SpecError whose lines read `field.path: what was expected (got ...)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from metascale.config.job import JobSpec
from metascale.config.sections import DataSpec, ModelSpec
from metascale.errors import SpecError


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, [_describe(err) for err in e.errors()]) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Reads a YAML spec and applies `dotted.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    raw = {} if raw is None else raw
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(str(path), [f"override '{item}': expected dotted.key=value"])
        if not isinstance(raw, dict):
            break
        _set_dotted(raw, key.split("."), yaml.safe_load(value))
    return parse_spec(raw, str(path))


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        raw = raw.setdefault(k, {})
        if not isinstance(raw, dict):
            raise SpecError("<override>", [f"{'.'.join(keys)}: '{k}' is not a section"])
    raw[keys[-1]] = value


def _tags(union: Any) -> set[str]:
    """The discriminator values of an Annotated[Union[...], Field(discriminator=...)] section."""
    members, field = get_args(union)
    return {m.model_fields[field.discriminator].default for m in get_args(members)}


# Discriminated unions add the tag to the location (data.glyphs.ways); _describe drops it for a path the user wrote.
UNION_TAGS = {"model": _tags(ModelSpec), "data": _tags(DataSpec)}


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p in UNION_TAGS.get(loc[i - 1], ()))]
    path = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/job-spec.md)"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {msg}{shown}"
