#!/usr/bin/env bash
# Measures the write outage of a failover as a client sees it: from the fault to
# the first acknowledged write on the new primary, for an in-region primary
# kill and a primary-region partition, with default settings (lease_ttl 6s).
# Prints every round and the median of each scenario.
#
#   bench/failover.sh [ROUNDS] [--peer REF]   (default 5; needs root for the partition)
#
# --peer REF builds meridian at the git commit REF (in a worktree under
# target/bench-peer, sharing target/ so dependencies are not rebuilt) and runs
# its rounds alternating with this checkout's, then prints both medians and
# their ratio. `--peer 612fac5`, the last commit before TLS, measures what
# TLS and authentication cost a failover.
#
# The client is psql with libpq's multi-host connection string and
# target_session_attrs=read-write, as an application would connect; one
# attempt costs ~20 ms, which bounds the resolution. Each round runs in a fresh
# lab on its own --net, stopped by `lab down` even on failure.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rounds=5 peer_ref=""
while [ $# -gt 0 ]; do
  case $1 in
    --peer) peer_ref=${2:?--peer needs a git commit}; shift 2 ;;
    *[!0-9]* | "") echo "usage: bench/failover.sh [ROUNDS] [--peer REF]" >&2; exit 2 ;;
    *) rounds=$1; shift ;;
  esac
done
peer=""
if [ -n "$peer_ref" ]; then
  sha=$(git rev-parse --verify "$peer_ref^{commit}")
  peer=target/bench-peer/meridian-$sha
  if [ ! -x "$peer" ]; then
    src=target/bench-peer/src-$sha
    [ -d "$src" ] || git worktree add --detach "$src" "$sha" >/dev/null
    echo "building the peer $sha (release)..."
    (cd "$src" && cargo build --release --quiet --target-dir ../..)
    cp target/release/meridian "$peer"
    git worktree remove --force "$src"
  fi
fi
bin=${MERIDIAN_BIN:-target/release/meridian}
# Always: a peer build just replaced target/release/meridian.
[ -n "${MERIDIAN_BIN:-}" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work" # PostgreSQL runs as its own user and must reach the data directories
lab=""
lab_bin=""
cleanup() { [ -n "$lab" ] && "$lab_bin" lab down --dir "$lab" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s%N; }

# One round: $1 scenario, $2 net, $3 the binary. Prints the outage in seconds.
round() {
  local scenario=$1 net=$2 bin=$3 nodes=1 old=127.$2.1.11
  [ "$scenario" = in-region-kill ] && nodes=2
  lab=$work/lab-$net
  lab_bin=$bin
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

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

net=90
for scenario in in-region-kill region-partition; do
  if [ "$scenario" = region-partition ] && [ "$(id -u)" -ne 0 ]; then
    echo "$scenario: skipped (needs root)"; continue
  fi
  ours=() theirs=()
  for i in $(seq 1 "$rounds"); do
    # Alternate which goes first, so drift on shared cores falls on both.
    order="ours theirs"; [ $((i % 2)) -eq 0 ] && order="theirs ours"
    for who in $order; do
      [ "$who" = theirs ] && [ -z "$peer" ] && continue
      b=$bin; [ "$who" = theirs ] && b=$peer
      rto=$(round "$scenario" "$net" "$b")
      net=$((net + 1))
      if [ "$who" = ours ]; then ours+=("$rto"); label=""; else theirs+=("$rto"); label=" (peer ${peer_ref})"; fi
      echo "$scenario round $i$label: ${rto}s"
    done
  done
  m_ours=$(printf '%s\n' "${ours[@]}" | median)
  echo "$scenario: median ${m_ours}s over $rounds rounds (${ours[*]})"
  if [ -n "$peer" ]; then
    m_theirs=$(printf '%s\n' "${theirs[@]}" | median)
    echo "$scenario: peer $peer_ref median ${m_theirs}s (${theirs[*]}); this checkout / peer = $(ratio "$m_ours" "$m_theirs")"
  fi
done
