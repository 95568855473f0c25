"""Reads W&B run files, to check what a job logged: the reader lives in the package (metascale/wandb_files.py), which
`metascale plot` uses too."""

from metascale.wandb_files import (  # noqa: F401 - re-exported for the tests
    artifacts,
    find_run_files,
    history,
    records,
    run_files,
    run_id,
    run_info,
    settled,
    settled_history,
)
