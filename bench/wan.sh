#!/usr/bin/env bash
# What a WAN between regions costs, measured side by side with none: on the
# netns lab (a namespace per process, a router between regions, the WAN relay
# for the delay; docs/lab.md), for each WAN in turn, alternating:
#
#   - commit latency p50/p99 with [replication] synchronous = off | region | remote
#     (pgbench, 4 clients, one INSERT per transaction, per-transaction log);
#   - replication lag of the remote standby under that load (synchronous = off:
#     pg_stat_replication.replay_lag on the primary, sampled every 0.5 s);
#   - failover RTO for a primary node kill and a primary-region partition, and
#     a switchover's write gap (meridian drill, 3 writers at 40 inserts/s);
#   - the TCP round trip between regions (what a packet sees).
#
#   bench/wan.sh [WAN ...]    (default: 0ms 40ms; root; one-way delays)
#   MERIDIAN_WAN_ROUNDS=N     drill rounds per scenario (default 3; the median is printed)
#
# Each lab runs on its own --net and is stopped by `lab down` even on failure.
# The client (pgbench, drill) runs in the root namespace, which reaches every
# host without delay: a client in the primary's region.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
wans=("$@")
[ ${#wans[@]} -gt 0 ] || wans=(0ms 40ms)
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -n "${MERIDIAN_BIN:-}" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-wan-XXXXXX)
chmod 755 "$work"
lab=""
cleanup() { [ -n "$lab" ] && "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# percentile P of the numbers on stdin
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {if (NR==0) {print "-"; exit} i=int(NR*p/100+0.999); if (i<1) i=1; print a[i]}'; }

up() { # $1 net, $2 wan, $3 synchronous
  lab=$work/lab-$1
  local wan=()
  [ "$2" = 0ms ] || wan=(--wan-latency "$2")
  "$bin" lab up --net "$1" --dir "$lab" --hosts netns "${wan[@]}" --nodes-per-region 2 --no-backup \
    --synchronous "$3" >/dev/null 2>>"$work/progress.log" || { cat "$work/progress.log" >&2; return 1; }
  export PGPASSFILE=$lab/pgpass PGSSLMODE=require
}
down() { "$bin" lab down --dir "$lab" >/dev/null; lab=""; }

# Commit latency in ms (p50 p99) against the primary, and the remote standby's replay lag (p50 max, ms).
commits() { # $1 net
  local host=10.$1.1.11 out=$work/pgbench-$1
  psql -h "$host" -U app -d app -qc "CREATE TABLE IF NOT EXISTS b (id bigserial PRIMARY KEY, v int)"
  echo "INSERT INTO b (v) VALUES (1);" >"$work/insert.sql"
  mkdir -p "$out"
  (cd "$out" && pgbench -h "$host" -U app -n -c 4 -j 2 -T 10 -f "$work/insert.sql" -l app >/dev/null 2>&1) &
  local pid=$! lags=$work/lags-$1
  : >"$lags"
  while kill -0 "$pid" 2>/dev/null; do
    psql -h "$lab/nodes/ap-south-1a/run" -U postgres -d postgres -Atc \
      "SELECT COALESCE(EXTRACT(epoch FROM replay_lag) * 1000, 0) FROM pg_stat_replication WHERE application_name = 'ap-northeast-1a'" \
      >>"$lags" 2>/dev/null || true
    sleep 0.5
  done
  wait "$pid"
  local lat
  lat=$(cat "$out"/pgbench_log.* | awk '{print $3 / 1000}')
  printf '%.1f %.1f %d %.1f %.1f\n' "$(pct 50 <<<"$lat")" "$(pct 99 <<<"$lat")" "$(grep -c . <<<"$lat")" \
    "$(pct 50 <"$lags")" "$(pct 100 <"$lags")"
}

rounds=${MERIDIAN_WAN_ROUNDS:-3}
drill_rto() { # $1 scenario -> RTO in ms: median and range of $rounds rounds
  MERIDIAN_CONFIG=$lab/meridian.toml "$bin" drill --json --scenario "$1" --rounds "$rounds" --writers 3 --rate 40 \
    2>>"$work/progress.log" | python3 -c '
import json, sys
rounds = json.load(sys.stdin)["rounds"]
rtos = sorted(r["rto_ms"] for r in rounds if r.get("rto_ms") is not None)
lost = sum(r["missing_acknowledged"] for r in rounds)
mid = "%d" % rtos[len(rtos) // 2] if rtos else "-"
span = " (%d..%d)" % (rtos[0], rtos[-1]) if len(rtos) > 1 else ""
print("%s ms%s over %d rounds, %d acknowledged writes lost" % (mid, span, len(rounds), lost))'
}

rtt() { # $1 net -> TCP connect round trip between regions, ms (p50 of 20)
  ip netns exec "mlab$1-ap-south-1a" python3 -c "
import socket, time
v = []
for _ in range(20):
    s = socket.socket(); t = time.perf_counter(); s.connect(('10.$1.2.11', 5432)); v.append((time.perf_counter() - t) * 1000); s.close()
v.sort(); print('%.1f' % v[10])"
}

net=200
declare -A result
for sync in off region remote; do
  for wan in "${wans[@]}"; do
    net=$((net + 1))
    up "$net" "$wan" "$sync"
    read -r p50 p99 n lag50 lagmax <<<"$(commits "$net")"
    result[$wan,$sync]="commit p50 ${p50} ms p99 ${p99} ms ($n tx)"
    if [ "$sync" = off ]; then
      result[$wan,rtt]=$(rtt "$net")
      result[$wan,lag]="remote standby replay lag under load p50 ${lag50} ms max ${lagmax} ms"
      result[$wan,kill]=$(drill_rto primary-node-kill)
      result[$wan,switchover]=$(drill_rto switchover)
      result[$wan,partition]=$(drill_rto primary-region-partition)
    fi
    echo "done: WAN $wan, synchronous = $sync" >&2
    down
  done
done

for wan in "${wans[@]}"; do
  echo "WAN $wan one way (TCP round trip between regions measured: ${result[$wan,rtt]} ms)"
  for sync in off region remote; do echo "  synchronous = $sync: ${result[$wan,$sync]}"; done
  echo "  ${result[$wan,lag]}"
  echo "  failover, primary node killed: RTO ${result[$wan,kill]}"
  echo "  failover, primary region partitioned: RTO ${result[$wan,partition]}"
  echo "  switchover: write gap ${result[$wan,switchover]}"
done
