"""Where a run's checkpoints (and its lease) live: a local path, `s3://bucket/prefix`, or any other fsspec URL.

`url_to_fs(url)` gives an fsspec filesystem and the path on it. `s3://` (and `s3a://`) goes to `S3FileSystem` below,
a small fsspec filesystem over obstore (the Rust `object_store` crate's Python binding), not to fsspec's own s3fs:

- s3fs needs botocore, and botocore pins `python-dateutil<3` while `kubernetes==37.0.2` (what `metascale submit`
  uses) needs `>=3`: the two cannot share an environment (docs/data.md, "Sources").
- `pyarrow.fs.S3FileSystem` (what Ray Train's storage uses) needs no botocore either, but `ray[default]` does not
  bring pyarrow (170 MB installed, against obstore's 16 MB), and it has no conditional write: the lease could only
  be "exists? then write" there.
- obstore sends `pipe_file(path, data, mode="create")` as a conditional PUT (`If-None-Match: *`): the server refuses
  it when the object exists (HTTP 412), so the lease (cluster/lease.py) is exclusive on S3 as it is on local disk.
  AWS S3 has supported this since August 2024; MinIO, Ceph RGW and moto's server do too. `conditional_create`
  tells the lease so.

Configuration is the usual AWS environment: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or an instance, pod or
web-identity role), `AWS_DEFAULT_REGION` / `AWS_REGION`, and for S3-compatible stores `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (an `http://` endpoint is allowed over plain HTTP). A single PUT is atomic and S3 reads are
strongly consistent after a write: a reader sees all of an object or none of it, which is what checkpoint.py builds
its atomic checkpoints on.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Iterator

import fsspec
from fsspec.spec import AbstractFileSystem

S3_PREFIXES = ("s3://", "s3a://")


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path on it, without a trailing slash) for a local path or URL."""
    if url.startswith(S3_PREFIXES):
        fs = S3FileSystem()
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def _first_line(e: BaseException) -> str:
    """obstore's messages carry a multi-line debug dump after the first line, which says what failed."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def _errors(path: str, create: bool = False) -> Iterator[None]:
    """obstore's exceptions as the OSErrors fsspec callers expect, with one-line messages."""
    from obstore import exceptions as ox

    try:
        yield
    except FileNotFoundError as e:  # obstore's NotFoundError is one
        raise FileNotFoundError(f"s3://{path}: not found") from e
    except (ox.AlreadyExistsError, ox.PreconditionError) as e:
        if create:
            raise FileExistsError(f"s3://{path}: exists") from e
        raise OSError(f"s3://{path}: {_first_line(e)}") from e
    except (ox.PermissionDeniedError, ox.UnauthenticatedError) as e:
        raise PermissionError(f"s3://{path}: {_first_line(e)}") from e
    except ox.BaseError as e:
        raise OSError(f"s3://{path}: {_first_line(e)}") from e


class S3FileSystem(AbstractFileSystem):
    """The operations checkpoints and the lease need, on S3 and S3-compatible stores, through obstore. Paths are
    `bucket/key`; "directories" are key prefixes (they exist while an object lies under them)."""

    protocol = ("s3", "s3a")
    root_marker = ""
    conditional_create = True  # pipe_file(mode="create") is a conditional PUT, atomic on the server

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._stores: dict[tuple, Any] = {}

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        for prefix in S3_PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path.rstrip("/")

    def _store(self, bucket: str) -> Any:
        """obstore's client for a bucket, made from the environment as it is now (one per bucket and settings)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        key = (bucket, endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"))
        if key not in self._stores:
            from obstore.store import S3Store

            kwargs: dict[str, Any] = {}
            if endpoint:
                kwargs["endpoint"] = endpoint
                if endpoint.startswith("http://"):
                    kwargs["client_options"] = {"allow_http": True}
            if region:
                kwargs["region"] = region
            self._stores[key] = S3Store(bucket, **kwargs)
        return self._stores[key]

    def _split(self, path: str) -> tuple[Any, str, str]:
        path = self._strip_protocol(path)
        bucket, _, key = path.partition("/")
        if not bucket:
            raise ValueError(f"s3://{path}: no bucket in the URL")
        return self._store(bucket), bucket, key

    # -- files ---------------------------------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        import obstore

        store, _, key = self._split(path)
        with _errors(self._strip_protocol(path)):
            data = bytes(obstore.get(store, key).bytes())
        return data[start:end] if start is not None or end is not None else data

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        import obstore

        store, _, key = self._split(path)
        create = mode == "create"
        with _errors(self._strip_protocol(path), create=create):
            obstore.put(store, key, bytes(value), mode="create" if create else "overwrite")

    def rm_file(self, path: str) -> None:
        import obstore

        store, _, key = self._split(path)
        with _errors(self._strip_protocol(path)):
            obstore.delete(store, key)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        import obstore

        for p in [path] if isinstance(path, str) else path:
            store, _, key = self._split(p)
            keys = [key] if key else []
            if recursive:
                with _errors(self._strip_protocol(p)):
                    prefix = f"{key}/" if key else None
                    keys += [o["path"] for o in obstore.list(store, prefix).collect()]
            with _errors(self._strip_protocol(p)):
                obstore.delete(store, keys)  # deleting a missing key is not an error on S3

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        """A server-side copy, then a delete: the destination object appears whole (S3's CopyObject)."""
        import obstore

        store, bucket1, key1 = self._split(path1)
        _, bucket2, key2 = self._split(path2)
        if bucket1 != bucket2:
            raise NotImplementedError("s3: moving between buckets")
        with _errors(self._strip_protocol(path1)):
            obstore.rename(store, key1, key2)

    def modified(self, path: str) -> Any:
        return self.info(path)["mtime"]

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode == "rb":
            return io.BytesIO(self.cat_file(path))
        if mode == "wb":
            return _PutOnClose(self, path)
        raise NotImplementedError(f"s3: open mode {mode!r}")

    # -- listing -------------------------------------------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        import obstore

        name = self._strip_protocol(path)
        store, bucket, key = self._split(path)
        if key:
            try:
                with _errors(name):
                    head = obstore.head(store, key)
                return {"name": name, "size": head["size"], "type": "file", "mtime": head["last_modified"]}
            except FileNotFoundError:
                pass
        with _errors(name):
            found = obstore.list_with_delimiter(store, f"{key}/" if key else None)
        if not key or found["objects"] or found["common_prefixes"]:
            return {"name": name, "size": 0, "type": "directory"}
        raise FileNotFoundError(f"s3://{name}: not found")

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The objects and prefixes right under `path` (none for a prefix that holds nothing)."""
        import obstore

        name = self._strip_protocol(path)
        store, bucket, key = self._split(path)
        with _errors(name):
            found = obstore.list_with_delimiter(store, f"{key}/" if key else None)
        entries = [{"name": f"{bucket}/{p}", "size": 0, "type": "directory"} for p in found["common_prefixes"]]
        entries += [
            {"name": f"{bucket}/{o['path']}", "size": o["size"], "type": "file", "mtime": o["last_modified"]}
            for o in found["objects"]
        ]
        if not entries and key:
            with contextlib.suppress(FileNotFoundError):
                entries = [self.info(path)] if self.info(path)["type"] == "file" else []
        return entries if detail else [e["name"] for e in entries]

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Object stores have no directories: a prefix exists once an object lies under it."""

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass


class _PutOnClose(io.BytesIO):
    """A write-mode file whose bytes go up in one PUT when it is closed (so the object appears whole)."""

    def __init__(self, fs: S3FileSystem, path: str):
        super().__init__()
        self._fs, self._path = fs, path

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:  # a failed write uploads nothing
            super().close()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self._fs.pipe_file(self._path, self.getvalue())
        super().close()
