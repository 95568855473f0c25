"""The small local record of submitted jobs: which cluster each ID lives on, and the last `--to` used.

So `metascale status ID` needs no `--to` after a submit from this machine. The file is rewritten atomically.
Location: $METASCALE_STATE_DIR, else $XDG_STATE_HOME/metascale, else ~/.local/state/metascale.
A cancelled Kubernetes job also leaves here its last status and its log (logs/ID.log), read before KubeRay deleted
the pods that held them, so `status` and `logs` still answer after `cancel`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from metascale.files import atomic_write

MAX_JOBS = 1000  # oldest records are dropped beyond this


def state_path() -> Path:
    root = os.environ.get("METASCALE_STATE_DIR")
    if not root:
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        root = str(Path(xdg) / "metascale")
    return Path(root) / "jobs.json"


def load() -> dict[str, Any]:
    try:
        data = json.loads(state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"last_target": None, "jobs": {}}
    data.setdefault("last_target", None)
    data.setdefault("jobs", {})
    return data


def remember(job_id: str, target_url: str, name: str) -> None:
    data = load()
    data["last_target"] = target_url
    data["jobs"][job_id] = {"target": target_url, "name": name, "submitted": time.time()}
    if len(data["jobs"]) > MAX_JOBS:
        newest = sorted(data["jobs"].items(), key=lambda kv: kv[1].get("submitted", 0))[-MAX_JOBS:]
        data["jobs"] = dict(newest)
    _write(data)


def mark_cancelled(job_id: str, target_url: str, name: str, message: str) -> None:
    data = load()
    record = data["jobs"].setdefault(job_id, {"target": target_url, "name": name, "submitted": time.time()})
    record["cancelled"] = {"at": time.time(), "message": message}
    _write(data)


def cancelled(job_id: str) -> dict[str, Any] | None:
    """{'name', 'message', 'at'} of a job cancelled from this machine, else None."""
    record = load()["jobs"].get(job_id) or {}
    return {"name": record.get("name", ""), **record["cancelled"]} if "cancelled" in record else None


def save_log(job_id: str, text: str) -> None:
    path = state_path().parent / "logs" / f"{job_id}.log"  # job IDs are checked DNS labels: a plain file name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())


def saved_log(job_id: str) -> str | None:
    try:
        return (state_path().parent / "logs" / f"{job_id}.log").read_text(errors="replace")
    except FileNotFoundError:
        return None


def target_of(job_id: str) -> str | None:
    record = load()["jobs"].get(job_id)
    return record["target"] if record else None


def last_target() -> str | None:
    return load()["last_target"]


def _write(data: dict[str, Any]) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1).encode())
