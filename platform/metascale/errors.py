"""User-facing errors: the CLI prints their message (no stack trace) and exits with their code."""

from __future__ import annotations


class MetascaleError(Exception):
    """An error the user can fix; `str(e)` is the whole message."""

    exit_code = 1


class SpecError(MetascaleError):
    """A job spec (or CLI argument) that does not validate: one line per problem, with the field path."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid job spec {source}:\n{lines}")


class DataError(MetascaleError):
    """Bad task data: names the shard and sample where it can."""

    exit_code = 2


class OptInError(MetascaleError):
    """A valid request that metascale carries out only when the user opts in; the message names the flag."""

    exit_code = 2


class ModelError(MetascaleError):
    """A model the spec names cannot be built (a user's module) or initialised (`model.init_from`): bad input."""

    exit_code = 2


class CheckpointError(MetascaleError):
    exit_code = 2


class CheckpointWriteError(MetascaleError):
    """A checkpoint could not be written, even after retries: the run stopped; the message names the last step
    saved. Its own exit code, so a scheduler can tell it from bad input (2) and from a failed run (1)."""

    exit_code = 3


class ClusterError(MetascaleError):
    """A cluster refused a request, could not be reached, or could not place the job: one actionable line."""

    exit_code = 1


class NotAClusterError(ClusterError):
    """`--to` answered, but not as the service it names (a web page where a Ray dashboard should be): a wrong address,
    so bad input (exit 2), unlike a cluster that is down or refuses a request."""

    exit_code = 2


def from_loader_worker(e: BaseException) -> BaseException:
    """A DataLoader re-raises a worker's exception with the worker's whole traceback in its message. Our errors are
    written for users (a shard, a sample, what to do), so this gives back the original message alone."""
    text = str(e)
    if not isinstance(e, MetascaleError) or "Original Traceback" not in text:
        return e
    head = f"{type(e).__module__}.{type(e).__name__}: "
    at = text.rfind(head)
    return type(e)(text[at + len(head) :].strip() if at >= 0 else text.splitlines()[-1])
