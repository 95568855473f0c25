"""YAML in, JobSpec out: any problem becomes a SpecError whose lines read `field.path: what was expected (got ...)`."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from metascale.config.job import JobSpec
from metascale.config.data import DataSpec
from metascale.config.sections import ModelSpec
from metascale.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; a bigger file is a wrong path (a data file, /dev/zero)

# How a wrong value is quoted in a problem line: short and on one line, whatever the YAML held (a 5,000-digit number,
# a list built from aliases that would print as gigabytes). reprlib takes keyword arguments only from Python 3.12.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 2, 6, 6, 4, 4
_repr.maxstring, _repr.maxlong, _repr.maxother = 80, 40, 80


def _shown(value: Any, limit: int = 120) -> str:
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, [_describe(err) for err in e.errors()]) from None
    if problems := _template_problems(spec):
        raise SpecError(source, problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Reads a YAML spec and applies `dotted.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    raw = _yaml(_read(path), str(path))
    raw = {} if raw is None else raw
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(str(path), [f"override {item!r}: expected dotted.key=value"])
        if not isinstance(raw, dict):
            break
        _set_dotted(raw, key.split("."), _yaml(value, str(path), f"override {item!r}: "), str(path))
    return parse_spec(raw, str(path))


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except IsADirectoryError:
        raise SpecError(str(path), ["is a directory, not a YAML file"]) from None
    except OSError as e:
        raise SpecError(str(path), [f"cannot read it ({e.strerror or e})"]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), [f"larger than {MAX_SPEC_BYTES >> 10} KiB: not a job spec"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"byte {e.start}: not UTF-8 text ({e.reason}); a job spec is a YAML file"
        raise SpecError(str(path), [problem]) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a scalar it cannot convert is a YAML error at that node. Its constructors
    call int(), float(), datetime() and dict lookups on the text and let their plain exceptions through:
    `2020-13-45` (ValueError), a 5,000-digit integer (Python's digit limit), `!!bool maybe` (KeyError)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # noqa: BLE001 - whatever a constructor raises, the text at this node is the cause
            what = f"{_shown(node.value)} is not a valid {node.tag.rpartition(':')[2]}"
            raise yaml.constructor.ConstructorError(None, None, f"{what}: {_first_line(e)}", node.start_mark) from None


def _yaml(text: str, source: str, prefix: str = "") -> Any:
    """Parses one YAML document; every way the text can be wrong is one SpecError line, `prefix` first."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: plain data, never objects
    except yaml.YAMLError as e:
        problem = _yaml_problem(e, text)
    except RecursionError:
        problem = "nested too deeply to be a job spec"
    raise SpecError(source, [prefix + problem])


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: only its offset is known
        before = text[: e.position]
        line, column = before.count("\n") + 1, e.position - before.rfind("\n")
    else:
        return f"not valid YAML ({_first_line(e)})"
    what = getattr(e, "problem", None) or getattr(e, "context", None) or _first_line(e)
    return f"line {line}, column {column}: not valid YAML ({what})"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _set_dotted(raw: dict, keys: list[str], value: Any, source: str) -> None:
    for k in keys[:-1]:
        raw = raw.setdefault(k, {})
        if not isinstance(raw, dict):
            raise SpecError(source, [f"{'.'.join(keys)}: '{k}' is not a section"])
    raw[keys[-1]] = value


# Paths that are templates over the job (JobSpec.path): any other placeholder, or a lone brace, would only fail as a
# KeyError once the run had started.
TEMPLATES = {"checkpoint.dir": lambda s: s.checkpoint.dir, "logging.wandb.dir": lambda s: s.logging.wandb.dir}


def _template_problems(spec: JobSpec) -> list[str]:
    problems = []
    for field, value in TEMPLATES.items():
        try:
            spec.path(value(spec))
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            problems.append(
                f"{field}: {{name}} is the only placeholder, and a literal brace is written {{{{ or }}}} "
                f"({type(e).__name__}: {_first_line(e)}; got {_shown(value(spec))})"
            )
    return problems


def _tags(union: Any) -> set[str]:
    """The discriminator values of an Annotated[Union[...], Field(discriminator=...)] section."""
    members, field = get_args(union)
    return {m.model_fields[field.discriminator].default for m in get_args(members)}


# Discriminated unions add the tag to the location (data.glyphs.ways); _describe drops it for a path the user wrote.
UNION_TAGS = {"model": _tags(ModelSpec), "data": _tags(DataSpec)}


def _describe(err: dict) -> str:
    # A key is quoted when it would not read as itself on one line (YAML allows any string, or a number, as a key).
    loc = [p if isinstance(p, str) and p.isprintable() else repr(p) for p in err["loc"]]
    loc = [p for p in loc if not p.startswith("function-after")]
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p in UNION_TAGS.get(loc[i - 1], ()))]
    path = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/job-spec.md)"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {_shown(got)})"
    return f"{path}: {msg}{shown}"
