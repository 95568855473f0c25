"""Jobs on a Ray cluster through its Job Submission API (`ray.job_submission.JobSubmissionClient`).

The resolved spec travels in the job's runtime_env working_dir (a directory holding only that file); the entrypoint
is the fixed `metascale run metascale-job.yaml`. The W&B API key is never sent: the cluster's nodes hold it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from metascale.submit.backend import TERMINAL, JobInfo, http_timeout
from metascale.monitor import JOB_ID_ENV
from metascale.submit.package import SPEC_FILE, PreparedJob
from metascale.errors import ClusterError, NotAClusterError
from metascale.submit.targets import RayTarget, check_job_id

SUBMITTER = "metascale"  # metadata marking the jobs `metascale list` shows


def _client_class():
    """Ray's JobSubmissionClient sends every request (version check, upload, submit, status, logs) through
    _do_request and never passes a timeout; this one adds backend.http_timeout() to each."""
    from ray.job_submission import JobSubmissionClient

    class TimedClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs):
            kwargs.setdefault("timeout", http_timeout())
            return super()._do_request(method, endpoint, **kwargs)

    return TimedClient


class RayJobs:
    def __init__(self, target: RayTarget):
        self.target = target
        self._client = None

    def _connect(self):
        if self._client is None:
            for noisy in ("dashboard_sdk", "job.sdk"):  # INFO lines per upload and per closed log stream
                logging.getLogger(f"ray.dashboard.modules.{noisy}").setLevel(logging.WARNING)
            logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)

            with self._errors(), self._not_ray():
                self._client = _client_class()(self.target.address)
        return self._client

    def submit(self, job: PreparedJob, dry_run: bool = False) -> str:
        client = self._connect()  # connects and checks the version even on a dry run
        if dry_run:
            return job.job_id
        with tempfile.TemporaryDirectory(prefix="metascale-job-") as workdir, self._errors(job.job_id):
            (Path(workdir) / SPEC_FILE).write_text(job.spec_yaml)
            client.submit_job(
                entrypoint=job.entrypoint(SPEC_FILE),
                submission_id=job.job_id,
                runtime_env={"working_dir": workdir, "env_vars": {JOB_ID_ENV: job.job_id}},  # the W&B run's job_id
                metadata={"metascale.submitter": SUBMITTER, "metascale.job": job.spec.name},
            )
        return job.job_id

    def status(self, job_id: str) -> JobInfo:
        check_job_id(job_id)
        with self._errors(job_id):
            return _info(self._connect().get_job_info(job_id))

    def logs(self, job_id: str, follow: bool, emit: Callable[[str], None]) -> None:
        check_job_id(job_id)
        client = self._connect()
        with self._errors(job_id):
            if not follow:
                emit(client.get_job_logs(job_id))
                return
            client.get_job_info(job_id)  # a clear 404 before the websocket opens
            asyncio.run(self._follow(client, job_id, emit))

    async def _follow(self, client, job_id: str, emit: Callable[[str], None]) -> None:
        """Ray's websocket tail has no read timeout, and a running job may rightly print nothing for minutes. So
        after each READ_TIMEOUT_S without a chunk the job's status is asked (a request with timeouts): a cluster that
        does not answer is an error, a finished job whose stream stays open ends the follow, a running one is waited
        for."""
        last_chunk = time.monotonic()

        async def tail() -> None:
            nonlocal last_chunk
            async for chunk in client.tail_job_logs(job_id):
                last_chunk = time.monotonic()
                emit(chunk)

        task = asyncio.ensure_future(tail())
        try:
            while not task.done():
                read = http_timeout()[1]
                await asyncio.wait({task}, timeout=read)
                if task.done() or time.monotonic() - last_chunk < read:
                    continue
                if _info(await asyncio.to_thread(client.get_job_info, job_id)).status in TERMINAL:
                    return
            task.result()
        finally:
            task.cancel()

    def cancel(self, job_id: str) -> None:
        check_job_id(job_id)
        with self._errors(job_id):
            self._connect().stop_job(job_id)

    def list(self) -> list[JobInfo]:
        with self._errors():
            jobs = self._connect().list_jobs()
        ours = [j for j in jobs if (j.metadata or {}).get("metascale.submitter") == SUBMITTER and j.submission_id]
        return [_info(j) for j in sorted(ours, key=lambda j: j.start_time or 0)]

    @contextmanager
    def _not_ray(self) -> Iterator[None]:
        """The client's first request is GET /api/version; a server that answers it with a 404, a page that is not
        JSON (ValueError), JSON that is not a mapping (TypeError) or has no `ray_version` (KeyError), or a version
        that does not parse (ValueError) is not a Ray dashboard: a wrong port or host in --to."""
        try:
            yield
            return
        except RuntimeError as e:
            if "Version check returned 404" not in str(e):
                raise
            problem = "404"
        except (ValueError, KeyError, TypeError) as e:
            problem = f"not Ray's answer, {type(e).__name__}"
        raise NotAClusterError(
            f"{self.target.address} answers HTTP but is not a Ray dashboard (GET /api/version: {problem}); --to takes "
            "the Ray head's dashboard address, e.g. http://HEAD:8265"
        ) from None

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Ray's client raises ConnectionError / RuntimeError('Request failed with status code N: body'); the
        websocket of `logs --follow` raises aiohttp's errors."""
        import aiohttp

        where = f"the Ray cluster at {self.target.address}"
        try:
            yield
        except requests.ReadTimeout:
            raise ClusterError(
                f"{where} did not answer within {http_timeout()[1]:g} s (is --to its "
                "dashboard port, and is the head overloaded?)"
            ) from None
        except (ConnectionError, requests.ConnectionError, requests.Timeout):
            raise ClusterError(f"cannot reach {where} (is the head running and its dashboard port open?)") from None
        except aiohttp.ClientError as e:
            raise ClusterError(f"lost the log stream of {where} ({type(e).__name__}: {_first_line(str(e))})") from None
        except requests.HTTPError as e:
            raise ClusterError(_http_message(e.response.status_code, e.response.text, where, job_id)) from None
        except RuntimeError as e:
            m = re.search(r"status code (\d+): (.*)", str(e), re.S)
            if not m:
                raise ClusterError(f"{where}: {_first_line(str(e))}") from None
            body = m.group(2).removesuffix(".")  # Ray's client appends '.' to the body
            raise ClusterError(_http_message(int(m.group(1)), body, where, job_id)) from None


def _http_message(code: int, body: str, where: str, job_id: str | None) -> str:
    detail = _first_line(body)
    if code == 404 and job_id:
        return f"no job {job_id} on {where}"
    if code in (401, 403):
        return f"{where} refused the request ({code}): check its auth token (RAY_AUTH_TOKEN / ~/.ray/auth_token)"
    if "already exists" in body:  # Ray 2.60 answers a reused submission ID with 500 and a traceback
        return f"a job with ID {job_id} already exists on {where}"
    return f"{where} answered {code}: {detail}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return line[:300]


def _info(details) -> JobInfo:
    meta = details.metadata or {}
    return JobInfo(
        job_id=details.submission_id or details.job_id or "",
        name=meta.get("metascale.job", ""),
        status=str(details.status.value if hasattr(details.status, "value") else details.status),
        message=_first_line(details.message or ""),
    )
