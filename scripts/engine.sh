#!/usr/bin/env bash
# A private container engine for CI and for machines without one: Debian's docker.io, its own dockerd with every
# path of its own (data under .cache/engine/ in the checkout, sockets under /tmp), no bridge network and no
# iptables rules (containers run with --network none or --network host only).
#
#   eval "$(scripts/engine.sh start)"   # prints `export DOCKER_HOST=... DOCKER=...` for the engine that answers
#   scripts/engine.sh stop              # ends the dockerd that `start` started, by its pid
#
# `start` uses an engine that already answers (DOCKER_HOST or the default socket) and starts none then; else it
# needs root: it installs docker.io with apt-get when dockerd is missing and starts dockerd. Every wait is bounded;
# a failure is one line on stderr and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STATE=$REPO/.cache/engine
# Unix socket paths must fit 107 bytes: the run folder lives under /tmp, named after the checkout.
RUN=/tmp/metascale-engine-$(printf '%s' "$REPO" | sha256sum | cut -c1-12)
die() { echo "engine: $*" >&2; exit 1; }

start() {
  local cli=${DOCKER:-docker}
  if command -v "$cli" >/dev/null && "$cli" version >/dev/null 2>&1; then
    echo "engine: using the engine that answers at ${DOCKER_HOST:-the default socket}" >&2
    echo "export DOCKER=$(command -v "$cli")"
    return
  fi
  local sock=$RUN/docker.sock
  if [ -s "$STATE/dockerd.pid" ] && DOCKER_HOST=unix://$sock /usr/bin/docker version >/dev/null 2>&1; then
    echo "engine: using the dockerd started here before (pid $(cat "$STATE/dockerd.pid")) at $sock" >&2
    echo "export DOCKER_HOST=unix://$sock DOCKER=/usr/bin/docker"
    return
  fi
  [ "$(id -u)" = 0 ] || die "no container engine answers and starting one needs root (run as root, or start Docker)"
  mkdir -p "$STATE" "$RUN"
  local t=$SECONDS
  if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ]; then
    local log=$STATE/apt.log
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >"$log" 2>&1 \
      || { apt-get update -q >>"$log" 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >>"$log" 2>&1; }; } \
      || die "cannot install docker.io: $(grep -E '^E: ' "$log" | head -1) (log: $log)"
    echo "engine: installed Debian's docker.io $(dpkg-query -W -f '${Version}' docker.io) in $(( SECONDS - t )) s" >&2
  fi
  stop_quietly
  local log=$STATE/dockerd.log
  # setsid: out of the caller's process group (a Ctrl-C there reaches the caller's `stop`, not dockerd mid-build)
  setsid dockerd --data-root "$STATE/data" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" -H "unix://$sock" \
    --bridge=none --iptables=false --shutdown-timeout 10 >"$log" 2>&1 < /dev/null &
  echo $! > "$STATE/dockerd.pid"
  local pid=$! deadline=$(( SECONDS + 60 ))
  until DOCKER_HOST=unix://$sock /usr/bin/docker version >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "dockerd exited at start: $(grep -iE 'level=(fatal|error)|failed' "$log" | tail -1) (log: $log)"
    [ $SECONDS -lt $deadline ] || { stop_quietly; die "dockerd did not answer within 60 s (log: $log)"; }
    sleep 0.5
  done
  echo "engine: dockerd $(DOCKER_HOST=unix://$sock /usr/bin/docker version -f '{{.Server.Version}}') (pid $pid, no bridge network) answering at $sock after $(( SECONDS - t )) s" >&2
  # Debian's CLI, the same version as this dockerd, with BuildKit built in (a newer CLI elsewhere on PATH may lack buildx)
  echo "export DOCKER_HOST=unix://$sock DOCKER=/usr/bin/docker"
}

descendants() {  # the pids of every process below $1 (dockerd's containerd, which runs in a session of its own)
  local e stat ppid kids=""
  for e in /proc/[0-9]*; do
    stat=$(cat "$e/stat" 2>/dev/null) || continue
    read -r _ ppid _ <<< "${stat##*) }"  # after "pid (comm) ": state ppid ...
    if [ "$ppid" = "$1" ]; then kids="$kids ${e#/proc/}"; fi
  done
  for e in $kids; do echo "$e"; descendants "$e"; done
}

stop_quietly() {  # ends the dockerd recorded in .cache/engine/dockerd.pid, if it is still the one started here
  local pid tree p deadline
  pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || return 0
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "--data-root $STATE/data"; then
    tree=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true  # dockerd stops its containers (--shutdown-timeout) and its containerd
    deadline=$(( SECONDS + 30 ))
    while [ $SECONDS -lt $deadline ]; do
      p=$pid; for p in $pid $tree; do kill -0 "$p" 2>/dev/null && break; p=""; done
      [ -n "$p" ] || break
      sleep 0.5
    done
    for p in $pid $tree; do kill -KILL "$p" 2>/dev/null || true; done
    # what dockerd leaves mounted (its network namespace file; overlays after a hard kill), then its run folder
    awk -v run="$RUN/" -v data="$STATE/data/" 'index($2, run) == 1 || index($2, data) == 1 {print $2}' /proc/self/mounts \
      | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    rm -rf "$RUN"
  fi
  rm -f "$STATE/dockerd.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop_quietly; echo "engine: stopped" >&2 ;;
  *) echo "usage: scripts/engine.sh start|stop" >&2; exit 2 ;;
esac
