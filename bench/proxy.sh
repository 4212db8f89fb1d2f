#!/usr/bin/env bash
# Measures what the gateway's SQL proxy costs: pgbench through the writer port,
# directly against the primary, and through the peer most clusters use for the
# same job (HAProxy in TCP mode, as in Patroni setups), in the same lab and the
# same run, alternating so that drift (autovacuum, checkpoints, page cache)
# hits all of them. Prints TPS and mean latency per run, then the median of
# each and the ratios to direct. Target: at least 0.9 of direct TPS for
# select-only (-S).
#
#   bench/proxy.sh [SECONDS_PER_RUN] [REPETITIONS]     (default 15 s, 3)
#
# pgbench: 8 clients, 2 threads, scale 10, simple protocol, one connection per
# client for the whole run (what a pooled application does). The lab runs on
# loopback, so the proxy's cost shows undiluted by network latency.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
seconds=${1:-15}
reps=${2:-3}
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work" # PostgreSQL runs as its own user and must reach the data directories
lab=$work/lab
net=${MERIDIAN_BENCH_NET:-95}
cleanup() {
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null
  "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" lab up --dir "$lab" --net "$net" >"$work/up.log" 2>&1 ||
  { echo "lab up failed:" >&2; cat "$work/up.log" >&2; exit 1; }
export PGPASSFILE=$lab/pgpass
direct="host=127.$net.1.11 port=5432 user=app dbname=app"
proxy="host=127.$net.1.2 port=6432 user=app dbname=app"
paths=(direct proxy)
haproxy="host=127.$net.1.3 port=6432 user=app dbname=app"
if command -v haproxy >/dev/null; then
  printf '%s\n' global "    maxconn 1000" defaults "    mode tcp" "    timeout connect 3s" "    timeout client 1h" \
    "    timeout server 1h" "listen primary" "    bind 127.$net.1.3:6432" "    server primary 127.$net.1.11:5432" \
    >"$work/haproxy.cfg"
  haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid"
  paths+=(haproxy)
else
  echo "haproxy is not installed (scripts/setup installs it): the peer is skipped"
fi
echo "pgbench through the proxy ($proxy), directly ($direct) and through HAProxy ($haproxy)"
echo "8 clients, 2 threads, ${seconds}s per run, $reps runs each, alternating"
pgbench -q -i -s 10 "$direct" >"$work/init.log" 2>&1 || { cat "$work/init.log" >&2; exit 1; }

# One run: $1 label, $2 connection string, $3.. extra pgbench options. Prints "tps latency_ms".
run() {
  local conn=$2
  shift 2
  local out
  out=$(pgbench -n -c 8 -j 2 -T "$seconds" "$@" "$conn" 2>&1) || { echo "$out" >&2; exit 1; }
  local tps lat
  tps=$(awk '/^tps = / { print $3; exit }' <<<"$out")
  lat=$(awk '/^latency average = / { print $4; exit }' <<<"$out")
  echo "$tps $lat"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for mode in select-only tpcb-like; do
  opts=()
  [ "$mode" = select-only ] && opts=(-S)
  for path in "${paths[@]}"; do : >"$work/$path"; done
  for i in $(seq 1 "$reps"); do
    for path in "${paths[@]}"; do
      conn=$direct
      [ "$path" = proxy ] && conn=$proxy
      [ "$path" = haproxy ] && conn=$haproxy
      read -r tps lat < <(run "$path" "$conn" "${opts[@]}")
      printf '%-12s %-7s run %d: %10.1f tps  %7.3f ms\n' "$mode" "$path" "$i" "$tps" "$lat"
      echo "$tps $lat" >>"$work/$path"
    done
  done
  d_tps=$(cut -d' ' -f1 "$work/direct" | median)
  for path in "${paths[@]}"; do
    tps=$(cut -d' ' -f1 "$work/$path" | median)
    lat=$(cut -d' ' -f2 "$work/$path" | median)
    awk -v m="$mode" -v p="$path" -v t="$tps" -v l="$lat" -v d="$d_tps" 'BEGIN {
      printf "%-12s median %-7s %10.1f tps  %7.3f ms  %5.3f of direct\n", m, p, t, l, t / d
    }'
  done
done
