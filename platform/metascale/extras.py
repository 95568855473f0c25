"""The optional parts of metascale and the pip extra that brings each.

`pip install metascale` runs every job on local or cluster Ray; DeepSpeed (sharded jobs), the Kubernetes client
(`--to k8s://`) and matplotlib (`metascale plot`) come with extras, `pip install 'metascale[deepspeed,k8s,plot]'`
(or `[all]`). Their modules are imported only where they are used, through `require`, so a missing one is one line
that names the extra rather than a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from metascale.errors import MetascaleError

# top-level module -> (pip extra, what needs it)
EXTRAS = {
    "deepspeed": ("deepspeed", "sharding.engine: deepspeed"),
    "kubernetes": ("k8s", "a KubeRay target (--to k8s://...)"),
    "matplotlib": ("plot", "metascale plot"),
    "mujoco": ("rl", "data.source 'halfcheetah_dir'"),
}


class MissingExtraError(MetascaleError):
    """An optional dependency is not installed: the message names the extra that brings it."""

    exit_code = 1


def require(module: str) -> ModuleType:
    """`import module`, or a MissingExtraError naming the extra (also when the module is there but one of its own
    dependencies is not: installing the extra brings both)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise _missing(top, f" ({e.name} is missing)" if e.name and e.name.split(".")[0] != top else "") from None


def check(module: str) -> None:
    """`require` without importing: for a driver that only starts the processes that import it (the coordinator
    never loads DeepSpeed itself), so the check costs it no memory."""
    if not available(module):
        raise _missing(module.split(".")[0], "")


def _missing(top: str, detail: str) -> MissingExtraError:
    extra, what = EXTRAS[top]
    return MissingExtraError(f"{what} needs {top}, which is not installed{detail}: pip install 'metascale[{extra}]'")


def available(module: str) -> bool:
    """Whether the module is installed, without importing it."""
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False
