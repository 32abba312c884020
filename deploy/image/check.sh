#!/usr/bin/env bash
# `make image-check`: prove the Dockerfile's image works, on this machine.
#
#  1. a Docker daemon: the one that answers, or one started here (and stopped
#     again at the end) with options that leave the host's network alone;
#  2. the base image: PYTHON_IMAGE if given (python:3.11-slim with a registry),
#     else the Debian one deploy/image/base.sh makes (cached after the first run);
#  3. the image, built with BuildKit on the host network (pip reaches PyPI);
#  4. a container of it on the host network, against the machine's RabbitMQ,
#     with its own QUEUE_PREFIX and a free SIDECAR_PORT, confined as the
#     Kubernetes Deployment confines it (read-only root, no capabilities, its
#     memory limit): /readyz must say ready,
#     `waddle-ai publish "hello everyone" --wait` (run inside the container)
#     must get a reply from the embedded model, the user must not be root, the
#     HEALTHCHECK must report healthy, and SIGTERM must stop it cleanly (exit 0);
#  5. the container, its queues and exchanges are removed whatever happened.
#
# Prints "image-check: passed" or "image-check: FAILED: …" (exit 1). Where no
# daemon can run, prints "image-check: skipped: <reason>" and exits 0, or 1
# when IMAGE_CHECK_REQUIRED=1. Settings (environment):
#   PYTHON_IMAGE            base image; unset: the Debian-made one
#   AMQP_URL                default amqp://guest:guest@127.0.0.1:5672/
#   DOCKER                  docker client; default: the first on PATH that can use BuildKit
#   IMAGE_TAG               default waddle-ai:image-check
#   IMAGE_CHECK_STORAGE_DRIVER  storage driver of a daemon started here (default:
#                           dockerd's choice, overlay2 where it works; vfs is the
#                           slow fallback), data root /var/lib/docker-<driver>
#   IMAGE_CHECK_REQUIRED    1: a skip is a failure
#   IMAGE_CHECK_KEEP_DAEMON 1: leave a daemon started here running
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE_DIR=.cache/image-check
IMAGE_TAG=${IMAGE_TAG:-waddle-ai:image-check}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
QUEUE_PREFIX="image-check-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
CONTAINER="waddle-ai-image-check-${QUEUE_PREFIX#image-check-}"
mkdir -p "$STATE_DIR"

started=$(date +%s)
say() { echo "image-check: $*"; }
elapsed() { echo "$(( $(date +%s) - started )) s"; }
skip() {
  say "skipped: $*"
  [ "${IMAGE_CHECK_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
}
fail() { echo "image-check: FAILED: $*" >&2; exit 1; }

# -- the docker client ----------------------------------------------------------
# The Dockerfile needs BuildKit. Docker 23+ clients build with it through the
# buildx plugin only; 20.10 clients (Debian bookworm's docker.io) have it built
# in (DOCKER_BUILDKIT=1). Take the first client that can.
buildkit_client() { # client
  "$1" buildx version >/dev/null 2>&1 && return 0
  local major
  major=$("$1" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
  [ -n "$major" ] && [ "$major" -lt 23 ]
}
pick_client() {
  local candidate
  for candidate in ${DOCKER:-$(which -a docker 2>/dev/null | awk '!seen[$0]++')}; do
    if buildkit_client "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}
DOCKER=$(pick_client) || skip "no docker client that can build with BuildKit (install Debian's docker.io, or the buildx plugin)"
export DOCKER DOCKER_BUILDKIT=1

# -- the daemon -------------------------------------------------------------------
daemon_pid=""
container_started=""
daemon_answers() { timeout 20 "$DOCKER" info >/dev/null 2>&1; }

cleanup() {
  local status=$?
  if [ -n "$container_started" ]; then
    "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    # Its queues and exchanges, from a throwaway container of the same image.
    "$DOCKER" run --rm -i --network host --entrypoint python \
      -e AMQP_URL="$AMQP_URL" -e QUEUE_PREFIX="$QUEUE_PREFIX" "$IMAGE_TAG" - \
      <deploy/image/delete_topology.py >/dev/null 2>&1 \
      || echo "image-check: could not delete the queues of $QUEUE_PREFIX" >&2
  fi
  if [ -n "$daemon_pid" ] && [ "${IMAGE_CHECK_KEEP_DAEMON:-0}" != 1 ]; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$daemon_pid" 2>/dev/null && echo "image-check: dockerd $daemon_pid still running" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# dockerd on the host network only: no docker0 bridge, no iptables rules, no
# ip_forward change, so the machine's firewall and routing stay as they were.
# Builds and containers use --network host instead.
start_daemon() {
  command -v dockerd >/dev/null || skip "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
  [ "$(id -u)" = 0 ] || skip "no Docker daemon answers and starting one needs root"
  local options=(--iptables=false --ip-forward=false --bridge=none)
  # Another storage driver gets its own data root: BuildKit's cache in the
  # default one refers to the first driver's layers and breaks builds on another.
  if [ -n "${IMAGE_CHECK_STORAGE_DRIVER:-}" ]; then
    options+=(--storage-driver="$IMAGE_CHECK_STORAGE_DRIVER"
              --data-root="/var/lib/docker-$IMAGE_CHECK_STORAGE_DRIVER")
  fi
  say "starting dockerd ${options[*]} (log: $STATE_DIR/dockerd.log)"
  setsid dockerd "${options[@]}" >"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
  daemon_pid=$!
  for _ in $(seq 1 60); do
    daemon_answers && return 0
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
      daemon_pid=""
      skip "dockerd cannot start here: $(grep -E 'level=(fatal|error)|failed to start' "$STATE_DIR/dockerd.log" | tail -n1 | sed 's/^.*msg=//')"
    fi
    sleep 1
  done
  skip "dockerd did not answer within 60 s (log: $STATE_DIR/dockerd.log)"
}

if daemon_answers; then
  say "using the Docker daemon that answers ($DOCKER)"
else
  start_daemon
fi
say "daemon $("$DOCKER" version --format '{{.Server.Version}}'), storage driver $("$DOCKER" info --format '{{.Driver}}'), client $DOCKER"

# -- the base image and the image -------------------------------------------------
if [ -z "${PYTHON_IMAGE:-}" ]; then
  base_status=0
  PYTHON_IMAGE=$(deploy/image/base.sh) || base_status=$?
  [ "$base_status" = 3 ] && skip "no base image: $PYTHON_IMAGE"
  [ "$base_status" = 0 ] || fail "deploy/image/base.sh failed"
fi
say "building $IMAGE_TAG from $PYTHON_IMAGE ($(elapsed) so far; log: $STATE_DIR/build.log)"
# pip inside the build trusts what this machine's pip trusts (PIP_CERT, else the
# system bundle), for networks that inspect TLS with their own CA.
ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
build_options=(--network host --progress plain --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" -t "$IMAGE_TAG")
[ -r "$ca_bundle" ] && build_options+=(--secret "id=pip-ca,src=$ca_bundle")
if ! "$DOCKER" build "${build_options[@]}" . >"$STATE_DIR/build.log" 2>&1; then
  tail -n 40 "$STATE_DIR/build.log" >&2
  fail "docker build failed (log: $STATE_DIR/build.log)"
fi
say "built $IMAGE_TAG, $("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE_TAG" | awk '{printf "%d MB", $1 / 1e6}') ($(elapsed) so far)"

# -- run it against the machine's broker ------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
container_started=1
# Confined as deploy/k8s/deployment.yaml confines it: read-only root with a
# writable /tmp, no capabilities, no privilege escalation, its memory limit.
# A short reply (AI_MAX_TOKENS) keeps the model's answer to seconds on a busy
# machine: what is proved is that the image answers, not how much it says.
"$DOCKER" run -d --name "$CONTAINER" --network host \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges --memory 1536m \
  -e AMQP_URL="$AMQP_URL" -e QUEUE_PREFIX="$QUEUE_PREFIX" \
  -e SIDECAR_HOST=127.0.0.1 -e SIDECAR_PORT="$port" -e LOG_FORMAT=json \
  -e AI_MAX_TOKENS=48 \
  "$IMAGE_TAG" >/dev/null || fail "docker run failed"
say "container $CONTAINER: QUEUE_PREFIX=$QUEUE_PREFIX, sidecar on 127.0.0.1:$port"

show_logs() { echo "--- container log (last 30 lines) ---" >&2; "$DOCKER" logs --tail 30 "$CONTAINER" >&2 2>&1 || true; }
running() { [ "$("$DOCKER" inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ]; }
http_ok() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }

ready=""
for _ in $(seq 1 180); do
  running || { show_logs; fail "the container exited: $("$DOCKER" inspect --format '{{.State.ExitCode}}' "$CONTAINER")"; }
  if http_ok "http://127.0.0.1:$port/readyz"; then ready=1; break; fi
  sleep 1
done
[ -n "$ready" ] || { show_logs; fail "/readyz did not say ready within 180 s"; }
say "/readyz: ready ($(elapsed) so far)"

uid=$("$DOCKER" exec "$CONTAINER" id -u)
[ "$uid" != 0 ] || fail "the worker runs as root"

if ! reply=$("$DOCKER" exec "$CONTAINER" waddle-ai publish "hello everyone" --wait --timeout 240); then
  show_logs; fail "no reply to the event"
fi
summary=$(printf '%s' "$reply" | python3 -c '
import json, sys
reply = json.load(sys.stdin)
if reply.get("provider") != "local" or not reply.get("response", "").strip():
    sys.exit(f"not an answer of the embedded model: {reply}")
model, ms, text = reply["model"], reply["processing_time_ms"], reply["response"]
print(f"{model} answered in {ms} ms: {text!r}")
') || { show_logs; fail "unexpected reply: $reply"; }
say "reply from the container: $summary"

health=""
for _ in $(seq 1 60); do
  health=$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$CONTAINER")
  [ "$health" = healthy ] && break
  [ "$health" = unhealthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { show_logs; fail "HEALTHCHECK says $health"; }
say "HEALTHCHECK: healthy; user id $uid"

"$DOCKER" stop --time 35 "$CONTAINER" >/dev/null
code=$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$CONTAINER")
[ "$code" = 0 ] || { show_logs; fail "the worker exited $code on SIGTERM (expected a clean drain, 0)"; }
say "stopped cleanly on SIGTERM"
say "passed in $(elapsed)"
