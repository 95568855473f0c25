"""Shared test set-up: one torch thread (2-core machines shared with other processes), small deterministic helpers."""

from __future__ import annotations

import os

# Before anything imports ray (it reads this at import): keep every Ray component on 127.0.0.1 (FIELD-NOTES).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
