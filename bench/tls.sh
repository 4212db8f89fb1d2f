#!/usr/bin/env bash
# Measures what TLS costs on the SQL path, in one lab and one run, alternating
# so drift hits every path alike: pgbench directly against the primary without
# TLS (the baseline: what meridian did before TLS; meridian's pg_hba admits no
# plain application login, so the bench adds one line for `app` from 127.0.0.1
# to this throw-away lab's primary and reloads it), directly with TLS
# (sslmode=require, PostgreSQL's own TLS with the node's certificate), and
# through the gateway's writer proxy, which terminates TLS with the gateway's
# certificate (sslmode=verify-full against the cluster CA), logs the client in
# with SCRAM itself and goes on to PostgreSQL over TLS. Two workloads:
# select-only on long-lived connections (the steady cost of encryption), and
# select-only with a new connection per transaction (-C: the handshake cost).
# Prints each run, the medians and the ratios to the baseline.
#
#   bench/tls.sh [SECONDS_PER_RUN] [REPETITIONS]     (default 10 s, 3)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
seconds=${1:-10}
reps=${2:-3}
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work" # PostgreSQL runs as its own user and must reach the data directories
lab=$work/lab
net=${MERIDIAN_BENCH_NET:-94}
cleanup() {
  "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" lab up --dir "$lab" --net "$net" >"$work/up.log" 2>&1 ||
  { echo "lab up failed:" >&2; cat "$work/up.log" >&2; exit 1; }
export PGPASSFILE=$lab/pgpass
ca=$lab/tls/ca/ca.crt
# The plain baseline: one pg_hba line on the primary (127.N.1.11, the lab's
# first node), for this bench only; meridian rewrites pg_hba at the next start.
primary_run=$lab/nodes/ap-south-1a/run
echo "host all app 127.0.0.1/32 scram-sha-256   # bench/tls.sh: the plain baseline" >>"$primary_run/pg_hba.conf"
psql -X -q -h "$primary_run" -U postgres -d postgres -c "SELECT pg_reload_conf()" >/dev/null
declare -A conn=(
  [plain]="host=127.$net.1.11 port=5432 user=app dbname=app sslmode=disable"
  [tls]="host=127.$net.1.11 port=5432 user=app dbname=app sslmode=require"
  [proxy-tls]="host=127.$net.1.2 port=6432 user=app dbname=app sslmode=verify-full sslrootcert=$ca"
)
paths=(plain tls proxy-tls)
echo "8 clients, 2 threads, ${seconds}s per run, $reps runs each, alternating"
for p in "${paths[@]}"; do echo "  $p: ${conn[$p]}"; done
pgbench -q -i -s 10 "${conn[plain]}" >"$work/init.log" 2>&1 || { cat "$work/init.log" >&2; exit 1; }

run() {
  local c=$1
  shift
  local out
  out=$(pgbench -n -c 8 -j 2 -T "$seconds" -S "$@" "$c" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$(awk '/^tps = / { print $3; exit }' <<<"$out") $(awk '/^latency average = / { print $4; exit }' <<<"$out")"
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for mode in steady connect-each; do
  opts=()
  [ "$mode" = connect-each ] && opts=(-C)
  for p in "${paths[@]}"; do : >"$work/$p"; done
  for i in $(seq 1 "$reps"); do
    for p in "${paths[@]}"; do
      read -r tps lat < <(run "${conn[$p]}" "${opts[@]}")
      printf '%-13s %-10s run %d: %10.1f tps  %7.3f ms\n' "$mode" "$p" "$i" "$tps" "$lat"
      echo "$tps $lat" >>"$work/$p"
    done
  done
  base=$(cut -d' ' -f1 "$work/plain" | median)
  for p in "${paths[@]}"; do
    tps=$(cut -d' ' -f1 "$work/$p" | median)
    lat=$(cut -d' ' -f2 "$work/$p" | median)
    awk -v m="$mode" -v p="$p" -v t="$tps" -v l="$lat" -v b="$base" 'BEGIN {
      printf "%-13s median %-10s %10.1f tps  %7.3f ms  %5.3f of plain\n", m, p, t, l, t / b
    }'
  done
done
