#!/usr/bin/env bash
# Creates .venv/ in the checkout with everything metascale needs (idempotent: re-running is cheap).
# torch is installed first from the pinned CPU build so that nothing can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.metascale-installed
want=$(cat pyproject.toml deploy/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c deploy/constraints.txt -e ".[deepspeed,k8s,plot,rl,test]"
echo "$want" > "$stamp"
