#!/usr/bin/env bash
# Measures the write outage of a failover as a client sees it: from the fault to
# the first acknowledged write on the new primary, for an in-region primary
# kill and a primary-region partition, with default settings (lease_ttl 6s).
# Prints every round and the median of each scenario.
#
#   bench/failover.sh [ROUNDS]        (default 5; needs root for the partition)
#
# The client is psql with libpq's multi-host connection string and
# target_session_attrs=read-write, as an application would connect; one
# attempt costs ~20 ms, which bounds the resolution. Each round runs in a fresh
# lab on its own --net, stopped by `lab down` even on failure.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rounds=${1:-5}
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work" # PostgreSQL runs as its own user and must reach the data directories
lab=""
cleanup() { [ -n "$lab" ] && "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s%N; }

# One round: $1 scenario, $2 net. Prints the outage in seconds.
round() {
  local scenario=$1 net=$2 nodes=1 old=127.$2.1.11
  [ "$scenario" = in-region-kill ] && nodes=2
  lab=$work/lab-$net
  "$bin" lab up --dir "$lab" --net "$net" --nodes-per-region "$nodes" >"$work/up.log" 2>&1 ||
    { echo "lab up failed:" >&2; cat "$work/up.log" >&2; exit 1; }
  local hosts="" ports=""
  for r in 1 2; do for k in $(seq 1 "$nodes"); do hosts+="127.$net.$r.$((10 + k)),"; ports+="5432,"; done; done
  local conn="host=${hosts%,} port=${ports%,} user=app dbname=app target_session_attrs=read-write connect_timeout=1"
  export PGPASSFILE=$lab/pgpass
  psql -X -q "$conn" -c "CREATE TABLE bench (at bigint, server inet)" >/dev/null
  local t0
  t0=$(now)
  case $scenario in
    in-region-kill) "$bin" lab kill ap-south-1a --dir "$lab" >/dev/null ;;
    region-partition) "$bin" lab partition ap-south-1 --dir "$lab" >/dev/null ;;
  esac
  local deadline=$((t0 + 60000000000)) server=""
  while :; do
    server=$(psql -X -q -A -t "$conn" -c "INSERT INTO bench VALUES ($(now), inet_server_addr()) RETURNING host(server)" 2>/dev/null || true)
    if [ -n "$server" ] && [ "$server" != "$old" ]; then break; fi
    [ "$(now)" -lt "$deadline" ] || { echo "no write on a new primary within 60s" >&2; exit 1; }
  done
  local t1
  t1=$(now)
  "$bin" lab down --dir "$lab" >/dev/null 2>&1
  lab=""
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", (b - a) / 1e9 }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

net=90
for scenario in in-region-kill region-partition; do
  if [ "$scenario" = region-partition ] && [ "$(id -u)" -ne 0 ]; then
    echo "$scenario: skipped (needs root)"; continue
  fi
  results=()
  for i in $(seq 1 "$rounds"); do
    rto=$(round "$scenario" "$net")
    net=$((net + 1))
    echo "$scenario round $i: ${rto}s"
    results+=("$rto")
  done
  echo "$scenario: median $(printf '%s\n' "${results[@]}" | median)s over $rounds rounds (${results[*]})"
done
