#!/usr/bin/env bash
# Caches KubeRay's CRDs (tag v1.7.0, the operator version the chart and the submitter target) in .cache/kuberay-crds/
# for the tests that validate RayJob/RayCluster objects against their schema (tests/k8s_emulator.py: crd_dir says
# where they are looked for). Idempotent. Without network it gives up within seconds and says nothing: those tests
# then use $METASCALE_KUBERAY_CRDS or CI's copy, or skip. Files are checked against pinned sha256 sums and written
# atomically; a file that does not match is not cached (one line on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import hashlib, os, sys, urllib.request

BASE = "https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/ray-operator/config/crd/bases/"
FILES = {
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
}
CACHE = os.path.join(".cache", "kuberay-crds")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached(name: str) -> bool:
    try:
        with open(os.path.join(CACHE, name), "rb") as f:
            return sha256(f.read()) == FILES[name]
    except OSError:
        return False


for name, want in FILES.items():
    if cached(name):
        continue
    try:
        with urllib.request.urlopen(BASE + name, timeout=5) as response:
            data = response.read()
    except OSError:  # no network, DNS, timeout, HTTP error: the first failure ends the attempt
        sys.exit(0)
    if sha256(data) != want:
        print(f"fetch-kuberay-crds: {BASE}{name} does not match its pinned sha256; not cached", file=sys.stderr)
        sys.exit(0)
    os.makedirs(CACHE, exist_ok=True)
    tmp = os.path.join(CACHE, f".{name}.{os.getpid()}.part")  # renamed into place whole, with the umask's mode
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(CACHE, name))
PY
