#!/usr/bin/env bash
# Builds the metascale image (deploy/Dockerfile) with no network inside the build, in three steps:
#   1. base       an image made from Debian's own packages: debootstrap of bookworm (python3, python3-venv,
#                 ca-certificates, tini, wget), trimmed, `docker import`ed as metascale-base:bookworm;
#   2. wheelhouse every wheel the image installs, made outside the build with `pip wheel` from the registries
#                 (deploy/constraints.txt pins them; the project's own wheel is made from this checkout);
#   3. image      `docker build --network none` from a staged context (the wheelhouse + deploy/image/), installed
#                 with `pip install --no-index`.
# The base tarball and the wheelhouse are cached under .cache/image/ and rebuilt only when what they are made from
# changes (the package list, constraints.txt, pyproject.toml). Carried to a machine without network, that folder is
# all --offline needs (docs/clusters.md, "Air-gapped").
#
# Usage: scripts/build-image.sh [--variant cpu|cuda] [--offline] [--base IMAGE] [--tag NAME]
#   --variant cpu   torch 2.13.0+cpu (the default), tagged metascale:0.1.0-cpu
#   --variant cuda  torch 2.13.0+cu128 from $TORCH_INDEX (PyTorch's CUDA 12.8 index), tagged metascale:0.1.0
#   --offline       use only what .cache/image/ holds; fail if anything is missing
#   --base IMAGE    build on IMAGE instead of the Debian base (it needs python3 of the wheelhouse's X.Y,
#                   python3-venv, bash, wget, tini and useradd)
# Needs a running container engine (`docker version` answers; scripts/engine.sh starts one) and, for the base,
# root and debootstrap. Prints one line per step with its time, then the image's size; any failure is one line on
# stderr naming the step and its log, and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

variant=cpu offline=0 base_override="" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=${2:?}; shift 2 ;;
    --offline) offline=1; shift ;;
    --base) base_override=${2:?}; shift 2 ;;
    --tag) tag=${2:?}; shift 2 ;;
    *) echo "build-image: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

DOCKER=${DOCKER:-docker}
PY=${PYTHON:-python3}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile)
case "$variant" in
  cpu) torch_req="torch==$TORCH_VERSION+cpu" torch_index=""; tag=${tag:-metascale:$VERSION-cpu} ;;
  cuda) torch_req="torch==$TORCH_VERSION+cu128" torch_index=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
        tag=${tag:-metascale:$VERSION} ;;
  *) echo "build-image: --variant takes cpu or cuda, not $variant" >&2; exit 2 ;;
esac

CACHE=$REPO/.cache/image
mkdir -p "$CACHE"
step="" log=""
die() { echo "build-image: $*" >&2; exit 1; }
trap 'rc=$?; die "step ${step:-setup} failed (exit $rc)${log:+; log: $log}"' ERR
elapsed() { local s=$(( SECONDS - $1 )); printf '%dm%02ds' $(( s / 60 )) $(( s % 60 )); }
t_all=$SECONDS

# --- the engine ----------------------------------------------------------------------------------------------------
step=engine
command -v "$DOCKER" >/dev/null || die "no docker CLI ($DOCKER) on PATH: install a container engine (scripts/engine.sh start does, as root)"
engine_err=$("$DOCKER" version --format '{{.Server.Version}}' 2>&1 >/dev/null) \
  || die "no container engine answers (${DOCKER_HOST:-the default socket}): ${engine_err%%$'\n'*}; scripts/engine.sh start starts one"

# --- 1. base ---------------------------------------------------------------------------------------------------------
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,tini,wget
# What the base is made of; a change (here or in the trimming below) makes a new tarball.
base_key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$(sed -n '/^trim_rootfs()/,/^}/p' "$0")" | sha256sum | cut -c1-16)
base_tar=$CACHE/base-$SUITE-$base_key.tar
base_image=metascale-base:$SUITE

trim_rootfs() {  # what an image never needs: apt's caches and lists, documentation (copyright files kept), locales
  local root=$1
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale "$root"/var/log/* "$root"/tmp/* \
         "$root"/debootstrap
  find "$root"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
  find "$root"/usr/share/doc -mindepth 1 -type d -empty -delete
}

clear_rootfs() {  # a debootstrap stopped midway leaves proc (and sys) mounted in its chroot: unmount whatever is mounted
  # below the folder, deepest first, then remove it without crossing into any mount that is left
  local root=$1 mnt
  awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt"
  done
  rm -rf --one-file-system "$root"
}

debian_mirror() {  # the Debian mirror apt uses on this machine (deb822 or one-line sources), else Debian's own
  local uri
  uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / '"$SUITE"'( |$)/ && u {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3=="'"$SUITE"'" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${METASCALE_DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

t=$SECONDS
if [ -n "$base_override" ]; then
  step=base
  base_image=$base_override
  "$DOCKER" image inspect "$base_image" >/dev/null 2>&1 || die "base image $base_image is not in the engine (docker pull or docker load it first)"
  echo "build-image: base $base_image (given)"
else
  base_how="cached tarball"
  if [ ! -s "$base_tar" ]; then
    step="base (debootstrap)"
    [ "$offline" = 0 ] || die "--offline: no base tarball $base_tar (make it on a machine with network: scripts/build-image.sh)"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root, or pass --base IMAGE"
    if ! command -v debootstrap >/dev/null; then
      log=$CACHE/apt.log
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >"$log" 2>&1 \
        || { apt-get update -q >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >>"$log" 2>&1; } \
        || die "cannot install debootstrap (apt-get install debootstrap; log: $log)"
    fi
    mirror=$(debian_mirror)
    rootfs=$CACHE/rootfs.tmp log=$CACHE/debootstrap.log
    clear_rootfs "$rootfs"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$log" 2>&1 \
      || die "debootstrap of $SUITE from $mirror failed: $(grep -E '^(E|W):' "$log" | tail -1) (log: $log)"
    trim_rootfs "$rootfs"
    rm -f "$CACHE"/base-"$SUITE"-*.tar
    tar --numeric-owner -C "$rootfs" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
    clear_rootfs "$rootfs"
    log="" base_how="debootstrap from $mirror"
  fi
  step="base (docker import)"
  if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "org.metascale.base-key"}}' "$base_image" 2>/dev/null)" != "$base_key" ]; then
    "$DOCKER" import --change "LABEL org.metascale.base-key=$base_key" --change 'CMD ["/bin/bash"]' \
      "$base_tar" "$base_image" >/dev/null
  fi
  echo "build-image: base $base_image: Debian $SUITE minbase + $PACKAGES ($base_how): $(( $(stat -c %s "$base_tar") / 1048576 )) MiB, $(elapsed "$t")"
fi

step="base (python)"
base_py=$("$DOCKER" run --rm --network none --entrypoint python3 "$base_image" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1) \
  || die "the base image $base_image runs no python3: ${base_py%%$'\n'*}"
host_py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$base_py" = "$host_py" ] || die "the base's Python is $base_py but the wheelhouse's ($PY) is $host_py: run with PYTHON=python$base_py"

# --- 2. wheelhouse -----------------------------------------------------------------------------------------------------
step=wheelhouse
t=$SECONDS
wheels=$CACHE/wheels-$variant
wh_key=$(cat deploy/constraints.txt pyproject.toml <(echo "$torch_req $torch_index $host_py") | sha256sum | cut -c1-16)
# the project's wheel is made from a copy of what it packages, so that no build/ or *.egg-info lands in the checkout
src=$CACHE/src
rm -rf "$src" && mkdir -p "$src" && cp -r pyproject.toml README.md platform "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
pipw() { DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip wheel -q --wheel-dir "$wheels" "$@"; }
# .key: what the wheelhouse was made from, then the name of every dependency's wheel in it
missing=""
if [ "$(head -1 "$wheels/.key" 2>/dev/null)" = "$wh_key" ]; then
  while read -r w; do [ -f "$wheels/$w" ] || { missing=$w; break; }; done < <(tail -n +2 "$wheels/.key")
fi
if [ "$(head -1 "$wheels/.key" 2>/dev/null)" != "$wh_key" ] || [ -n "$missing" ]; then
  if [ "$offline" = 1 ]; then
    if [ -n "$missing" ]; then die "--offline: $missing is missing from the wheelhouse $wheels (make the wheelhouse again on a machine with network: scripts/build-image.sh)"; fi
    die "--offline: the wheelhouse $wheels is absent or made from other pins than deploy/constraints.txt and pyproject.toml (make it on a machine with network: scripts/build-image.sh)"
  fi
  [ -z "$missing" ] || echo "build-image: $missing is missing from the cached wheelhouse: making it again"
  rm -rf "$wheels" && mkdir -p "$wheels"
  log=$CACHE/wheelhouse-$variant.log
  pipw --constraint deploy/constraints.txt ${torch_index:+--extra-index-url "$torch_index"} "$torch_req" "$src[deepspeed,k8s,rl]" >"$log" 2>&1 \
    || die "pip wheel failed: $(grep -m1 -E '^ERROR' "$log" || tail -1 "$log") (log: $log)"
  { echo "$wh_key"; find "$wheels" -name '*.whl' ! -name 'metascale-*' -printf '%f\n' | sort; } > "$wheels/.key"
  made="made from the registries"
  log=""
elif [ "$offline" = 0 ]; then  # dependencies cached: only the project's own wheel is made again, from this checkout
  rm -f "$wheels"/metascale-*.whl
  log=$CACHE/wheelhouse-$variant.log
  pipw --no-deps "$src" >"$log" 2>&1 || die "pip wheel of the project failed: $(grep -m1 -E '^ERROR' "$log" || tail -1 "$log") (log: $log)"
  made="dependencies cached, the project's wheel made again"
  log=""
else
  made="as carried (--offline)"
fi
rm -rf "$src"
n_wheels=$(find "$wheels" -name '*.whl' | wc -l)
ls "$wheels"/metascale-"$VERSION"-*.whl >/dev/null 2>&1 || die "the wheelhouse $wheels has no metascale $VERSION wheel"
echo "build-image: wheelhouse $wheels ($made): $n_wheels wheels, $(du -sm "$wheels" | cut -f1) MiB, $(elapsed "$t")"

# --- 3. image ---------------------------------------------------------------------------------------------------------
step=image
t=$SECONDS
ctx=$CACHE/context-$variant
rm -rf "$ctx" && mkdir -p "$ctx/wheels"
cp -l "$wheels"/*.whl "$ctx/wheels/" 2>/dev/null || cp "$wheels"/*.whl "$ctx/wheels/"
cp deploy/constraints.txt "$ctx/"
cp -r deploy/image "$ctx/image"
log=$CACHE/build-$variant.log
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# BuildKit where the CLI has it (a buildx plugin, or a CLI before 23.0 with it built in): no copy of the context
# into a layer, no commit of the build stage, ~1 minute less here. Else the classic builder (the same Dockerfile).
if "$DOCKER" buildx version >/dev/null 2>&1 \
   || [ "$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)" -lt 23 ] 2>/dev/null; then
  builder=BuildKit buildkit=1 progress=--progress=plain
else
  builder="the classic builder" buildkit=0 progress=""
fi
build_reason() {  # the first line that says why (pip's, apt's or the builder's), without BuildKit's "#9 12.3 " prefix
  sed -E 's/^#[0-9]+ [0-9.]+ //' "$1" | grep -m1 -E '^(ERROR|E|error): ' \
    || grep -m1 -E 'returned a non-zero code|did not complete successfully|^ERROR|^error' "$1" || tail -1 "$1"
}
# --network none: nothing in the build reaches a network.
DOCKER_BUILDKIT=$buildkit "$DOCKER" build --network none $progress -f deploy/Dockerfile -t "$tag" \
    --build-arg BASE="$base_image" --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.version="$VERSION" --label org.metascale.variant="$variant" \
    "$ctx" >"$log" 2>&1 \
  || die "docker build failed: $(build_reason "$log") (log: $log)"
# the classic builder keeps the build stage as an untagged image (its label names it); BuildKit keeps none
"$DOCKER" image prune -f --filter label=org.metascale.stage=build >/dev/null
rm -rf "$ctx"
log=""
bytes=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
echo "build-image: image $tag built with $builder, no network, in $(elapsed "$t")"
echo "build-image: $tag: $(awk -v b="$bytes" 'BEGIN {printf "%.2f GB (%d bytes", b / 1e9, b}'), docker image inspect .Size); all steps $(elapsed "$t_all")"
