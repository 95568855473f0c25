"""metascale: distributed meta-training."""


def version() -> str:
    """The installed distribution's version (pyproject.toml's `version`), as `metascale --version` prints it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("metascale")
    except PackageNotFoundError:
        return "unknown (not installed)"
