"""Where shards live: a local path, any fsspec URL (file://, s3://, gs://, ...) or a `pipe:` command template.

A `pipe:` root holds `{name}` where a file name goes, e.g. `pipe:aws s3 cp s3://bucket/set/{name} -`.
"""

from __future__ import annotations

from typing import BinaryIO


def join(root: str, name: str) -> str:
    if root.startswith("pipe:"):
        if "{name}" not in root:
            raise ValueError(f"pipe: source '{root}' needs a '{{name}}' placeholder for the file name")
        return root.replace("{name}", name)
    return root.rstrip("/") + "/" + name


def open_stream(url: str) -> BinaryIO:
    """Opens a file for streaming reads; raises FileNotFoundError for a missing local file."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        data = f.read()
    if url.startswith("pipe:") and not data:
        raise FileNotFoundError(url)
    return data
