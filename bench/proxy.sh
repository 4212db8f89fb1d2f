#!/usr/bin/env bash
# Measures what the gateway's SQL proxy costs next to its peers, in one lab and
# one run, alternating (each repetition in an order rotated by one) so that
# drift (autovacuum, checkpoints, page cache, growing tables) hits all of them:
#
#   direct      pgbench straight to the primary
#   session     meridian's writer port, [proxy] pool_mode = "session"
#   transaction meridian's writer port, pool_mode = "transaction" (pool 20)
#   pgbouncer   PgBouncer (Debian's 1.18), pool_mode = transaction, pool 20,
#               SCRAM with the role's secret in its auth_file, TLS both sides
#   haproxy     HAProxy in TCP mode, as in Patroni setups (TLS end to end)
#
# for pgbench select-only (-S) and TPC-B, simple and prepared protocol (-M),
# with 8 clients and with 200. Prints TPS and mean latency per run, then per
# cell the median of each path, its ratio to direct, the server connections
# it used (those active in the second half of the run) and its CPU per
# transaction (the proxy process's user+system time over the transactions of
# the run). First, each proxy's memory per idle client connection (RSS with
# 250 idle clients minus RSS before, per client), on fresh processes.
# meridian's pool mode changes between runs with `meridian config apply` (its
# cost: nothing; it waits until every gateway runs by it).
#
#   bench/proxy.sh [SECONDS_PER_RUN] [REPETITIONS]     (default 10 s, 3)
#   CLIENTS="8 200" MODES="select-only tpcb-like" PROTOCOLS="simple prepared"
#
# Every connection asks for TLS (sslmode=require): the proxies end it and
# speak TLS to the server, as a deployment does. The lab runs on loopback, so
# the proxies' cost shows undiluted by network latency. PgBouncer 1.18 keeps
# no protocol-level prepared statements in transaction mode (that came in
# 1.21): its prepared cells fail, and say so.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
seconds=${1:-10}
reps=${2:-3}
read -r -a client_counts <<<"${CLIENTS:-8 200}"
read -r -a modes <<<"${MODES:-select-only tpcb-like}"
read -r -a protocols <<<"${PROTOCOLS:-simple prepared}"
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work" # PostgreSQL and PgBouncer run as postgres and must reach their files
lab=$work/lab
net=${MERIDIAN_BENCH_NET:-95}
ulimit -n 8192 # 250 idle clients and 200 busy ones, each a socket in pgbench and in the proxy
idle_pid=""
cleanup() {
  [ -n "$idle_pid" ] && kill "$idle_pid" 2>/dev/null
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null
  [ -f "$work/pgbouncer/pgbouncer.pid" ] && kill "$(cat "$work/pgbouncer/pgbouncer.pid")" 2>/dev/null
  "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" lab up --dir "$lab" --net "$net" --pool-mode transaction >"$work/up.log" 2>&1 ||
  { echo "lab up failed:" >&2; cat "$work/up.log" >&2; exit 1; }
export PGPASSFILE=$lab/pgpass MERIDIAN_CONFIG=$lab/meridian.toml
superuser="host=$lab/nodes/ap-south-1a/run user=postgres dbname=app"

# 200 clients straight to the primary (and through the session-mode paths)
# need more than the lab's 50 connections: a restart, done as an operator does.
sed -i 's/^max_connections = 50$/max_connections = 300/' "$lab/meridian.toml"
grep -q '^max_connections = 300$' "$lab/meridian.toml" || { echo "no max_connections line to raise" >&2; exit 1; }
"$bin" config apply "$lab/meridian.toml" >"$work/apply.log" 2>&1 || { cat "$work/apply.log" >&2; exit 1; }
"$bin" rolling-restart --only-pending --reason "bench: max_connections 300" >"$work/restart.log" 2>&1 ||
  { cat "$work/restart.log" >&2; exit 1; }
primary=$("$bin" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["primary"])')
primary_addr=$(python3 -c '
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
regions = c.get("region") or c.get("regions")
print(next(n["address"] for r in regions for n in r.get("node", []) if n["name"] == sys.argv[2]).split(":")[0])
' "$lab/meridian.toml" "$primary")
superuser="host=$lab/nodes/$primary/run user=postgres dbname=app"
echo "primary $primary at $primary_addr; max_connections $(psql -X -Atc 'SHOW max_connections' "$superuser")"

pool_mode() { # $1: session|transaction, through config apply
  local now
  now=$(sed -n 's/^pool_mode = "\(.*\)"$/\1/p' "$lab/meridian.toml")
  [ "$now" = "$1" ] && return
  sed -i "s/^pool_mode = \"$now\"$/pool_mode = \"$1\"/" "$lab/meridian.toml"
  # apply returns once every agent and gateway runs by the new version; a
  # session keeps the mode it logged in with, and pgbench opens new ones.
  "$bin" config apply "$lab/meridian.toml" >"$work/apply.log" 2>&1 || { cat "$work/apply.log" >&2; exit 1; }
}

tls=(sslmode=require)
direct="host=$primary_addr port=5432 user=app dbname=app ${tls[*]}"
meridian="host=127.$net.1.2 port=6432 user=app dbname=app ${tls[*]}"
haproxy="host=127.$net.1.3 port=6432 user=app dbname=app ${tls[*]}"
pgbouncer="host=127.$net.1.4 port=6432 user=app dbname=app ${tls[*]}"
gateway_pid=$(cat "$lab/pids/gateway-ap-south-1.pid")
paths=(direct session transaction)

if command -v pgbouncer >/dev/null; then
  pb=$work/pgbouncer
  mkdir "$pb"
  secret=$(psql -X -Atc "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'" "$superuser")
  printf '"app" "%s"\n' "$secret" >"$pb/userlist.txt"
  cp "$lab/tls/gateway-ap-south-1/tls.crt" "$lab/tls/gateway-ap-south-1/tls.key" "$lab/tls/ca/ca.crt" "$pb/"
  cat >"$pb/pgbouncer.ini" <<EOF
[databases]
app = host=$primary_addr port=5432 dbname=app
[pgbouncer]
listen_addr = 127.$net.1.4
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $pb/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
client_tls_sslmode = require
client_tls_cert_file = $pb/tls.crt
client_tls_key_file = $pb/tls.key
server_tls_sslmode = verify-ca
server_tls_ca_file = $pb/ca.crt
logfile = $pb/pgbouncer.log
pidfile = $pb/pgbouncer.pid
EOF
  chown -R postgres: "$pb"
  chmod 600 "$pb/userlist.txt" "$pb/tls.key"
  pgbouncer -d -u postgres "$pb/pgbouncer.ini" || { cat "$pb/pgbouncer.log" >&2; exit 1; }
  for _ in $(seq 50); do [ -s "$pb/pgbouncer.pid" ] && break; sleep 0.1; done
  paths+=(pgbouncer)
else
  echo "pgbouncer is not installed (scripts/setup installs it): the peer is skipped"
fi
if command -v haproxy >/dev/null; then
  printf '%s\n' global "    maxconn 2000" defaults "    mode tcp" "    timeout connect 3s" "    timeout client 1h" \
    "    timeout server 1h" "listen primary" "    bind 127.$net.1.3:6432" "    server primary $primary_addr:5432" \
    >"$work/haproxy.cfg"
  haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid"
  paths+=(haproxy)
else
  echo "haproxy is not installed (scripts/setup installs it): the peer is skipped"
fi
pgbench -q -i -s 10 "$direct" >"$work/init.log" 2>&1 || { cat "$work/init.log" >&2; exit 1; }
echo "paths: ${paths[*]}; ${seconds}s per run, $reps runs each, alternating"


conn_of() {
  case $1 in
    direct) echo "$direct" ;;
    session | transaction) echo "$meridian" ;;
    pgbouncer) echo "$pgbouncer" ;;
    haproxy) echo "$haproxy" ;;
  esac
}
pid_of() {
  case $1 in
    session | transaction) echo "$gateway_pid" ;;
    pgbouncer) cat "$work/pgbouncer/pgbouncer.pid" ;;
    haproxy) cat "$work/haproxy.pid" ;;
    *) echo "" ;;
  esac
}
cpu_ticks() { [ -n "$1" ] && awk '{ print $14 + $15 }' "/proc/$1/stat" || echo 0; }
# Server connections of the app role used in the last $1 seconds (idle pooled
# connections of the other paths, kept by their pools, are not counted).
server_conns() {
  psql -X -Atc "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'
    AND (state = 'active' OR state_change > now() - interval '$1 seconds')" "$superuser"
}

# One run: $1 path, $2 clients, $3.. pgbench options. Prints "tps latency_ms cpu_us_per_txn server_conns" or "fail".
run() {
  local path=$1 clients=$2
  shift 2
  local conn pid before out after tps lat txns conns threads=2
  conn=$(conn_of "$path")
  pid=$(pid_of "$path")
  case $path in session | transaction) pool_mode "$path" ;; esac
  before=$(cpu_ticks "$pid")
  # TPC-B: pgbench first vacuums its branches and tellers and empties its
  # history (its default, through the path measured, before the clock
  # starts), or each run would find the tables of all the runs before it.
  local vacuum=-n
  [[ " $* " == *" -S "* ]] || vacuum=""
  pgbench $vacuum -c "$clients" -j "$threads" -T "$seconds" "$@" "$conn" >"$work/run.out" 2>&1 &
  local bench=$!
  sleep $((seconds / 2))
  conns=$(server_conns $((seconds / 2)))
  if ! wait "$bench"; then
    echo "fail $(grep -m1 -iE 'error|fatal' "$work/run.out" | cut -c1-100)"
    return
  fi
  after=$(cpu_ticks "$pid")
  out=$(cat "$work/run.out")
  tps=$(awk '/^tps = / { print $3; exit }' <<<"$out")
  lat=$(awk '/^latency average = / { print $4; exit }' <<<"$out")
  txns=$(awk '/^number of transactions actually processed: / { print $6; exit }' <<<"$out")
  awk -v t="$tps" -v l="$lat" -v n="$txns" -v c=$((after - before)) -v hz="$(getconf CLK_TCK)" -v k="$conns" \
    'BEGIN { printf "%s %s %.1f %d\n", t, l, (n > 0 ? c / hz * 1e6 / n : 0), k }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Memory per idle client, measured first, on processes that have served no
# client yet (an allocator keeps what a busier run freed, which would hide
# the cost): 250 clients (the session paths need a server connection each,
# max_connections is 300) that connect and then sit idle (pgbench at 1
# transaction per second for all of them together). meridian's gateway is
# restarted between its two modes.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
published_version() { "$bin" config show --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])'; }
gateway_version() {
  "$bin" status --json | python3 -c '
import json, sys
print(next((g.get("config_version", 0) for g in json.load(sys.stdin).get("gateways", []) if g["region"] == "ap-south-1"), -1))'
}
restart_gateway() {
  "$bin" lab kill gateway:ap-south-1 --dir "$lab" >/dev/null 2>&1
  "$bin" lab start gateway:ap-south-1 --dir "$lab" >"$work/start.log" 2>&1 || { cat "$work/start.log" >&2; exit 1; }
  gateway_pid=$(cat "$lab/pids/gateway-ap-south-1.pid")
  local want deadline=$((SECONDS + 20))
  want=$(published_version)
  until [ "$(gateway_version)" = "$want" ]; do
    [ $SECONDS -lt $deadline ] || { echo "the restarted gateway does not run by version $want" >&2; exit 1; }
    sleep 0.2
  done
}
idle_memory() { # $1: path
  local path=$1 pid before during
  pid=$(pid_of "$path")
  before=$(rss_kb "$pid")
  pgbench -n -c 250 -j 4 -R 1 -T 12 -S "$(conn_of "$path")" >"$work/idle.out" 2>&1 &
  idle_pid=$!
  sleep 9
  during=$(rss_kb "$pid")
  wait "$idle_pid" || { echo "idle clients through $path failed:" >&2; tail -3 "$work/idle.out" >&2; }
  idle_pid=""
  awk -v p="$path" -v b="$before" -v d="$during" 'BEGIN {
    printf "memory %-11s %8d kB before, %8d kB with 250 idle clients: %6.1f kB per idle client\n", p, b, d, (d - b) / 250
  }' | tee -a "$summary"
}
summary=$work/summary
: >"$summary"
for path in transaction session "${paths[@]:3}"; do
  if [ "$path" = session ]; then
    pool_mode session
    restart_gateway
  fi
  idle_memory "$path"
done
restart_gateway
echo

results=$work/results # per path, the current cell's runs
mkdir "$results"
for clients in "${client_counts[@]}"; do
  for mode in "${modes[@]}"; do
    for protocol in "${protocols[@]}"; do
      opts=(-M "$protocol")
      [ "$mode" = select-only ] && opts+=(-S)
      cell="$mode $protocol ${clients}c"
      for path in "${paths[@]}"; do : >"$results/$path"; done
      for i in $(seq 1 "$reps"); do
        # Each repetition starts one path further on, so that no path always
        # runs last (TPC-B slows from run to run as its tables grow: with a
        # fixed order the last path paid for it in every repetition).
        for k in "${!paths[@]}"; do
          path=${paths[$(((k + i - 1) % ${#paths[@]}))]}
          result=$(run "$path" "$clients" "${opts[@]}")
          if [[ $result == fail* ]]; then
            printf '%-32s %-11s run %d: FAILED (%s)\n' "$cell" "$path" "$i" "${result#fail }"
            echo "fail" >>"$results/$path"
            continue
          fi
          read -r tps lat cpu conns <<<"$result"
          printf '%-32s %-11s run %d: %9.1f tps %8.3f ms %7.1f us cpu/txn %4d server conns\n' \
            "$cell" "$path" "$i" "$tps" "$lat" "$cpu" "$conns"
          echo "$tps $lat $cpu $conns" >>"$results/$path"
        done
      done
      d_tps=$(grep -v fail "$results/direct" | cut -d' ' -f1 | median)
      for path in "${paths[@]}"; do
        if ! grep -qv fail "$results/$path"; then
          printf '%-32s median %-11s FAILED\n' "$cell" "$path" | tee -a "$summary"
          continue
        fi
        tps=$(grep -v fail "$results/$path" | cut -d' ' -f1 | median)
        lat=$(grep -v fail "$results/$path" | cut -d' ' -f2 | median)
        cpu=$(grep -v fail "$results/$path" | cut -d' ' -f3 | median)
        conns=$(grep -v fail "$results/$path" | cut -d' ' -f4 | median)
        awk -v c="$cell" -v p="$path" -v t="$tps" -v l="$lat" -v d="$d_tps" -v u="$cpu" -v k="$conns" 'BEGIN {
          printf "%-32s median %-11s %9.1f tps %8.3f ms %5.3f of direct %7.1f us cpu/txn %4d server conns\n", c, p, t, l, t / d, u, k
        }' | tee -a "$summary"
      done
    done
  done
done

echo
echo "summary"
cat "$summary"
