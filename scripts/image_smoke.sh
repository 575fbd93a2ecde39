#!/usr/bin/env bash
# Smoke test of the container image: build it, run a whole cluster from it, serve one trade.
#
#   scripts/image_smoke.sh [--no-build] [--image TAG] [--ref GIT_REF] [--replication-factor 2|3]
#
# Not part of the CI suite (CI has no container engine). It
#   1. builds the image from the Dockerfile (--no-build: reuse TAG as it is; --ref: build a
#      clean `git archive` of that commit instead of the work tree);
#   2. starts, as containers on the host network, bound to 127.0.0.1 on free ports picked at
#      random in 20000-31999 (never the ephemeral range other tests' port-0 servers use):
#      etcd, one control plane and three shard nodes (zones z1..z3, R = 2, 8 shards);
#   3. waits, each step with a deadline, for grpc.health.v1 SERVING on the four servers
#      (checked by the image's own Python) and for `bluemarblectl status` to show a leader,
#      3 nodes, no shard without a primary and none under-replicated;
#   4. with the image's own bluemarblectl (a client container of its own): grants two
#      players on different shards an item and 100 gold each, runs one cross-shard
#      `trade execute`, checks COMMITTED and both inventories after it;
#   5. removes every container it started, pass or fail (trap), after printing the last log
#      lines of each on failure. Exit status 0 on success, 1 with a message otherwise.
#
# Container engine: here, ../shared/tools/container (podman with a local Debian base);
# elsewhere podman or docker (CONTAINER_ENGINE=docker to choose). etcd runs from the same
# image with the host's etcd binary mounted read-only (ETCD_BIN, default `command -v etcd`;
# a glibc build such as Debian's etcd-server), or from ETCD_IMAGE when set (an image with
# `etcd` on its PATH, e.g. an official etcd release image). Needs python3 on the host (ports,
# etcd health). SMOKE_DEADLINE_S (default 120) bounds each wait.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=bluemarble:dev
BUILD=1
REF=
RF=2
SHARDS=8
DEADLINE_S=${SMOKE_DEADLINE_S:-120}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --image) IMAGE=${2:?--image needs a tag}; shift ;;
    --ref) REF=${2:?--ref needs a git ref}; shift ;;
    --replication-factor) RF=${2:?--replication-factor needs 2 or 3}; shift ;;
    -h|--help) usage ;;
    *) echo "image_smoke: unknown argument $1" >&2; usage ;;
  esac
  shift
done
case "$RF" in 2|3) ;; *) echo "image_smoke: --replication-factor must be 2 or 3 (3 nodes)" >&2; exit 2 ;; esac

log() { printf '[image_smoke %3ds] %s\n' "$SECONDS" "$*" >&2; }
FAILURE=
fail() { FAILURE="$*"; printf '[image_smoke %3ds] FAIL: %s\n' "$SECONDS" "$*" >&2; exit 1; }

# --- container engine -----------------------------------------------------------------
SHARED_TOOL="$ROOT/../shared/tools/container"
if [ -z "${CONTAINER_ENGINE:-}" ] && [ -x "$SHARED_TOOL" ]; then
  ctr() { "$SHARED_TOOL" podman "$@"; }
  ctr_build() { "$SHARED_TOOL" build "$@"; }   # adds the local base and the CA secret
else
  ENGINE=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
  [ -n "$ENGINE" ] || fail "no container engine: install podman or docker (or set CONTAINER_ENGINE)"
  ctr() { "$ENGINE" "$@"; }
  ctr_build() { "$ENGINE" build "$@"; }
fi
command -v python3 >/dev/null || fail "python3 is needed on the host (free ports, etcd health)"

RUN_ID="smoke$$"
WORK=$(mktemp -d)
CONTAINERS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local logs=
  if [ "$rc" -ne 0 ] && [ "${#CONTAINERS[@]}" -gt 0 ]; then
    # Each container's whole log is kept for the post-mortem; the last lines are shown.
    logs=$(mktemp -d "${TMPDIR:-/tmp}/image_smoke-$RUN_ID-logs.XXXX")
    for c in "${CONTAINERS[@]}"; do
      ctr logs "$c" > "$logs/$c.log" 2>&1 || true
      echo "----- last log lines of $c -----" >&2
      tail -n 8 "$logs/$c.log" >&2
    done
  fi
  if [ "${#CONTAINERS[@]}" -gt 0 ]; then
    ctr rm --force "${CONTAINERS[@]}" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ "$rc" -ne 0 ]; then
    echo "image_smoke: FAILED (exit $rc): ${FAILURE:-interrupted or an unexpected error}" >&2
    [ -z "$logs" ] || echo "image_smoke: containers' logs kept in $logs" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the image -----------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  CONTEXT=$ROOT
  REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$REF" ]; then
    REVISION=$(git -C "$ROOT" rev-parse --verify "$REF^{commit}") || fail "unknown git ref $REF"
    CONTEXT="$WORK/context"
    mkdir -p "$CONTEXT"
    git -C "$ROOT" archive "$REVISION" | tar -x -C "$CONTEXT"
  fi
  log "building $IMAGE from ${REF:-the work tree} ($REVISION)"
  build_start=$SECONDS
  # The revision as a build-time label too: buildah reuses a cached LABEL step whose ARG changed.
  ctr_build -t "$IMAGE" --build-arg REVISION="$REVISION" --label org.opencontainers.image.revision="$REVISION" -f "$CONTEXT/Dockerfile" "$CONTEXT" > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; fail "image build failed (last lines above)"; }
  log "built $IMAGE in $((SECONDS - build_start)) s"
else
  ctr image inspect "$IMAGE" >/dev/null 2>&1 || fail "--no-build: image $IMAGE does not exist"
fi
size=$(ctr image inspect "$IMAGE" --format '{{.Size}}')
log "image $IMAGE: $((size / 1000000)) MB"
SMOKE_START=$SECONDS

# --- 2. the cluster ---------------------------------------------------------------------
# Six distinct ports, each free to bind on 127.0.0.1 right now.
read -r P_ETCD P_PEER P_CP P_N1 P_N2 P_N3 < <(python3 - <<'EOF'
import random, socket
ports = []
while len(ports) < 6:
    p = random.randrange(20000, 32000)
    if p in ports:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
    ports.append(p)
print(*ports)
EOF
)
ETCD=127.0.0.1:$P_ETCD
CP=127.0.0.1:$P_CP
NODES=("127.0.0.1:$P_N1" "127.0.0.1:$P_N2" "127.0.0.1:$P_N3")
log "ports: etcd $P_ETCD/$P_PEER, control plane $P_CP, nodes $P_N1 $P_N2 $P_N3"

# start NAME IMAGE [ARGS...]: a detached container on the host network, removed by cleanup.
start() {
  local name="bm-$RUN_ID-$1"; shift
  CONTAINERS+=("$name")
  ctr run --detach --network host --name "$name" --label bluemarble.smoke="$RUN_ID" "$@" >/dev/null \
    || fail "could not start container $name"
}

etcd_args=(--name smoke --data-dir /tmp/etcd-smoke
  --listen-client-urls "http://$ETCD" --advertise-client-urls "http://$ETCD"
  --listen-peer-urls "http://127.0.0.1:$P_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$P_PEER"
  --initial-cluster "smoke=http://127.0.0.1:$P_PEER" --initial-cluster-state new)
if [ -n "${ETCD_IMAGE:-}" ]; then
  start etcd "$ETCD_IMAGE" etcd "${etcd_args[@]}"
else
  ETCD_BIN=${ETCD_BIN:-$(command -v etcd || true)}
  [ -x "$ETCD_BIN" ] || fail "no etcd binary on the host: install etcd-server, or set ETCD_BIN or ETCD_IMAGE"
  start etcd --volume "$ETCD_BIN:/opt/etcd/bin/etcd:ro" "$IMAGE" /opt/etcd/bin/etcd "${etcd_args[@]}"
fi

# wait_for SECONDS WHAT CMD...: run CMD until it succeeds; fail after SECONDS with its last
# output, or at once when one of the containers has stopped. The 0.5 s between attempts
# only paces the polling: every step waits for its own condition.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" > "$WORK/last" 2>&1; do
    # (only a definite "false" counts: an engine busy with other work may fail to answer)
    for c in "${CONTAINERS[@]}"; do
      [ "$(ctr inspect --format '{{.State.Running}}' "$c" 2>/dev/null)" != false ] \
        || fail "container $c stopped while waiting for $what"
    done
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${limit} s; last answer: $(tail -3 "$WORK/last")"
    sleep 0.5
  done
  log "ok: $what"
}

etcd_healthy() {
  python3 -c 'import json, sys, urllib.request
h = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
sys.exit(0 if h.get("health") == "true" else f"etcd says {h}")' "http://$ETCD/health"
}
wait_for "$DEADLINE_S" "etcd healthy at $ETCD" etcd_healthy

# A prepare deadline of 10 s instead of 2: this checks that the image serves a trade, not
# latency, and a machine busy building images must not turn the one trade into ABORTED.
start cp "$IMAGE" bluemarble-controlplane --listen "$CP" --etcd "$ETCD" --cluster "$RUN_ID" \
  --replica-id smoke-cp --replication-factor "$RF" --shards "$SHARDS" --lease-ttl-s 5 \
  --trade-prepare-timeout-s 10
for i in 1 2 3; do
  start "node$i" "$IMAGE" bluemarble-node --node-id "smoke-n$i" --listen "${NODES[i-1]}" \
    --control-plane "$CP" --zone "z$i" --region smoke
done

# grpc.health.v1 Check of every address given, by the image's own Python and grpcio.
HEALTH_PY='
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
bad = []
for addr in sys.argv[1:]:
    try:
        with grpc.insecure_channel(addr) as channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            bad.append(addr + " " + health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
    except grpc.RpcError as e:
        bad.append(addr + " " + e.code().name)
sys.exit("not serving: " + ", ".join(bad) if bad else 0)
'
CP_CONTAINER="bm-$RUN_ID-cp"
wait_for "$DEADLINE_S" "grpc health SERVING on the control plane and 3 nodes" \
  ctr exec "$CP_CONTAINER" python3 -c "$HEALTH_PY" "$CP" "${NODES[@]}"

# field NAME: the value of a "NAME   value" line of bluemarblectl's readable output on stdin.
field() { sed -nE "s/^$1 {2,}//p"; }

cluster_ready() {
  local out
  out=$(ctr exec "$CP_CONTAINER" bluemarblectl --control-plane "$CP" status) || return 1
  echo "$out"
  local leader
  leader=$(field leader <<<"$out")
  [ "$leader" != "(none elected)" ] && [ "${leader#unknown}" = "$leader" ] \
    && [ "$(field nodes <<<"$out")" = 3 ] \
    && [ "$(field 'shards without primary' <<<"$out")" = 0 ] \
    && [ "$(field 'shards under-replicated' <<<"$out")" = 0 ]
}
wait_for "$DEADLINE_S" "leader, 3 nodes registered, every shard with a primary and $RF copies" cluster_ready
READY_S=$((SECONDS - SMOKE_START))

# --- 4. one cross-shard trade through the image's bluemarblectl ------------------------------
# ctl ARGS...: the image's bluemarblectl in a client container of its own.
ctl() { ctr run --rm --network host "$IMAGE" bluemarblectl --control-plane "$CP" --timeout-s 15 "$@"; }
shard_of() { field shard | cut -d' ' -f1; }

A="alice-$RUN_ID"
SWORD="sword-$RUN_ID"
out=$(ctl grant "$A" "$SWORD" --gold 100) || fail "grant to $A failed: $out"
SHARD_A=$(shard_of <<<"$out")
[ -n "$SHARD_A" ] || fail "grant to $A did not name a shard: $out"
log "granted $A $SWORD and 100 gold on shard $SHARD_A"

# Try player names until one lands on another shard (each try is a real grant).
B='' SHIELD='' SHARD_B=''
for i in $(seq 1 16); do
  cand="bob$i-$RUN_ID" item="shield$i-$RUN_ID"
  out=$(ctl grant "$cand" "$item" --gold 100) || fail "grant to $cand failed: $out"
  s=$(shard_of <<<"$out")
  if [ -n "$s" ] && [ "$s" != "$SHARD_A" ]; then
    B=$cand SHIELD=$item SHARD_B=$s
    break
  fi
done
[ -n "$B" ] || fail "16 players all landed on $SHARD_A: is the ring a single shard?"
log "granted $B $SHIELD and 100 gold on shard $SHARD_B"

TRADE="trade-$RUN_ID"
trade_start=$SECONDS
set +e
out=$(ctl trade execute "$TRADE" "$A" "$B" --a-items "$SWORD" --a-gold 10 --b-items "$SHIELD" --b-gold 30)
rc=$?
set -e
echo "$out" >&2
[ "$rc" -eq 0 ] || fail "trade execute exited $rc (3 = ABORTED)"
[ "$(field outcome <<<"$out")" = COMMITTED ] || fail "trade $TRADE: outcome is not COMMITTED"
case "$(field kind <<<"$out")" in cross-shard*) ;; *) fail "trade $TRADE was not cross-shard" ;; esac
log "ok: trade $TRADE COMMITTED across $SHARD_A and $SHARD_B ($((SECONDS - trade_start)) s with the client container)"

# expect_inventory PLAYER GOLD ITEMS: the player's inventory after the trade.
expect_inventory() {
  local inv
  inv=$(ctl inventory "$1") || fail "inventory of $1 failed: $inv"
  if [ "$(field gold <<<"$inv")" != "$2" ] || [ "$(field items <<<"$inv")" != "$3" ]; then
    fail "inventory of $1: expected gold $2 and items $3, got:"$'\n'"$inv"
  fi
  log "ok: $1 holds $3 and $2 gold"
}
expect_inventory "$A" 120 "$SHIELD"
expect_inventory "$B" 80 "$SWORD"

log "PASS: image $IMAGE served a cross-shard trade (cluster ready in ${READY_S} s, smoke run $((SECONDS - SMOKE_START)) s)"
