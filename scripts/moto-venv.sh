#!/usr/bin/env bash
# Installs moto's S3 server (an S3-compatible API for tests on 127.0.0.1) into its own venv, .cache/moto-venv
# (gitignored), for tests/test_s3.py. Not in .venv: moto needs botocore, which pins python-dateutil<3, while the
# kubernetes client that metascale uses needs python-dateutil>=3; the server runs as a separate process.
# Idempotent (a stamp names what was installed); every pip download is bounded by --timeout, and tests/test_s3.py
# bounds the whole script. Prints nothing on success.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/moto-venv
PKGS="moto[s3]==5.2.5 flask==3.1.3 flask-cors==6.0.5"
stamp=$VENV/.metascale-installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PKGS" ]; then exit 0; fi
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC2086 # PKGS is a list of requirements
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q --timeout 60 --retries 2 $PKGS
echo "$PKGS" > "$stamp"
