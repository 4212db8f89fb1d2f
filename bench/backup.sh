#!/usr/bin/env bash
# Measures backups with pgBackRest in a lab, next to the peers on the same
# machine in the same run:
#   1. archive lag while pgbench writes as fast as it can (WAL MB/s produced;
#      p50/p99/max of the bytes and seconds the archive is behind), sampled
#      every second on the primary;
#   2. a full backup to the directory repository (`meridian backup create`)
#      against `pg_basebackup` and a plain `cp -a` of the same data directory,
#      alternating, as MB/s of database size and ratios;
#   3. a restore (`meridian restore --backup`, recovery included) against the
#      same `cp -a` and, after changing ~1% of the rows and an incremental
#      backup, a delta restore (`pgbackrest restore --delta`) of that restored
#      directory against a full one. The delta reads and checksums every
#      file: it pays where the repository is far (S3 across a WAN), not on a
#      local disk whose page cache holds the data.
#
#   bench/backup.sh [SCALE] [REPETITIONS] [WRITE_SECONDS]     (default 100, 2, 60)
#
# The lab's S3 repository (moto, in memory) is left out of the timings: it
# measures moto, not pgBackRest.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
scale=${1:-100}
reps=${2:-2}
write_seconds=${3:-60}
bin=${MERIDIAN_BIN:-target/release/meridian}
[ -x "$bin" ] || cargo build --release --quiet
bin=$(realpath "$bin")
work=$(mktemp -d /tmp/meridian-bench-XXXXXX)
chmod 755 "$work"
lab=$work/lab
net=${MERIDIAN_BENCH_NET:-96}
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill -INT "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  "$bin" lab down --dir "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" lab up --dir "$lab" --net "$net" >"$work/up.log" 2>&1 ||
  { echo "lab up failed:" >&2; cat "$work/up.log" >&2; exit 1; }
export MERIDIAN_CONFIG=$lab/meridian.toml PGPASSFILE=$lab/pgpass CI=true
primary="host=127.$net.1.11 port=5432 user=app dbname=app"
repo=ap-northeast-1 # the directory repository
node=ap-south-1a
data=$lab/nodes/$node/data
sql() { psql -X -At -c "$1" "$primary"; }
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1048576 / s }'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "pgbench -i -s $scale ..."
pgbench -q -i -s "$scale" "$primary" >"$work/init.log" 2>&1 || { cat "$work/init.log" >&2; exit 1; }
size=$(sql "SELECT sum(pg_database_size(oid)) FROM pg_database")
echo "database size: $((size / 1048576)) MB (every database)"

# 1. Archive lag under write load.
lag_sql="SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint,
  coalesce((pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint - ((('x' || substr(last_archived_wal, 9, 8))::bit(32)::bigint * 256
    + ('x' || substr(last_archived_wal, 17, 8))::bit(32)::bigint + 1) * 16777216), 0),
  coalesce(extract(epoch FROM now() - last_archived_time), 0)
  FROM pg_stat_archiver"
echo "pgbench -N -c 8 -j 2 -T $write_seconds, archive lag sampled every second ..."
pgbench -n -N -c 8 -j 2 -T "$write_seconds" "$primary" >"$work/write.log" 2>&1 &
bench_pid=$!
first=$(sql "$lag_sql" | cut -d'|' -f1)
started=$(now)
: >"$work/lag"
while kill -0 "$bench_pid" 2>/dev/null; do
  sql "$lag_sql" >>"$work/lag"
  sleep 1
done
wait "$bench_pid" || { cat "$work/write.log" >&2; exit 1; }
last=$(tail -1 "$work/lag" | cut -d'|' -f1)
elapsed=$(awk -v a="$started" -v b="$(now)" 'BEGIN { print b - a }')
pct() { cut -d'|' -f"$1" "$work/lag" | sort -g | awk -v p="$2" '{ a[NR] = $1 } END { i = int(NR * p); if (i < 1) i = 1; print a[i] }'; }
echo "WAL produced: $(mbps $((last - first)) "$elapsed") MB/s over ${elapsed%.*} s, $(awk '/^tps = / { print $3; exit }' "$work/write.log") tps"
echo "archive lag bytes: p50 $(($(pct 2 0.5) / 1048576)) MB, p99 $(($(pct 2 0.99) / 1048576)) MB, max $(($(pct 2 1.0) / 1048576)) MB"
echo "archive lag seconds (since the last archived file): p50 $(pct 3 0.5), p99 $(pct 3 0.99), max $(pct 3 1.0)"

# 2. Full backup vs pg_basebackup vs cp -a, alternating. pg_basebackup
# connects as a clone does: the replication role over verified TLS with the
# standby's certificate and passfile.
srun=$lab/nodes/ap-northeast-1a/run
basebackup_conn="host=127.$net.1.11 port=5432 user=replicator passfile=$srun/pgpass sslmode=verify-full sslrootcert=$srun/tls/ca.crt sslcert=$srun/tls/node.crt sslkey=$srun/tls/node.key"
for i in $(seq "$reps"); do
  t=$(now)
  "$bin" backup create --type full --repository "$repo" --json >"$work/create.json" 2>>"$work/progress.log"
  grep -q '"state":"succeeded"' "$work/create.json" || { cat "$work/create.json" >&2; exit 1; }
  echo "$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')" >>"$work/t_backup"
  rm -rf "$work/basebackup"
  install -d -o postgres -m 700 "$work/basebackup"
  t=$(now)
  runuser -u postgres -- pg_basebackup -D "$work/basebackup" -X none -c fast --no-password -d "$basebackup_conn" 2>>"$work/progress.log"
  echo "$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')" >>"$work/t_basebackup"
  rm -rf "$work/basebackup" "$work/copy"
  sync
  t=$(now)
  cp -a "$data" "$work/copy" && sync
  echo "$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')" >>"$work/t_cp"
  rm -rf "$work/copy"
done
b=$(median <"$work/t_backup")
pb=$(median <"$work/t_basebackup")
c=$(median <"$work/t_cp")
echo "full backup (median of $reps): pgBackRest $(mbps "$size" "$b") MB/s (${b}s), pg_basebackup $(mbps "$size" "$pb") MB/s (${pb}s), cp -a $(mbps "$size" "$c") MB/s (${c}s)"
echo "  ratios: pgBackRest/pg_basebackup $(awk -v a="$pb" -v b="$b" 'BEGIN { printf "%.2f", a / b }'), pgBackRest/cp $(awk -v a="$c" -v b="$b" 'BEGIN { printf "%.2f", a / b }') (speed; above 1 is faster)"

# 3. Restore, then a delta restore after a small change.
label=$("$bin" backup list --json | python3 -c "import json,sys; b=[x for x in json.load(sys.stdin)['backups'] if x['repository']=='$repo' and x['backup_type']=='full']; print(b[-1]['label'])")
into=$lab/restore-into.toml
restored=$lab/restored/$node/data
for i in $(seq "$reps"); do
  "$bin" --config "$into" destroy --yes >/dev/null 2>&1 || true
  t=$(now)
  "$bin" restore --backup "$label" --repository "$repo" --into "$into" --json >"$work/restore.json" 2>>"$work/progress.log"
  echo "$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')" >>"$work/t_restore"
done
r=$(median <"$work/t_restore")
echo "restore of $label (median of $reps, recovery included): $(mbps "$size" "$r") MB/s (${r}s); cp -a $(mbps "$size" "$c") MB/s; ratio $(awk -v a="$c" -v b="$r" 'BEGIN { printf "%.2f", a / b }')"

# 1% of the rows, contiguous: 1% of pgbench_accounts' pages (plus the WAL they need).
sql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= $scale * 1000" >/dev/null
"$bin" backup create --type incr --repository "$repo" --json >"$work/incr.json" 2>>"$work/progress.log"
grep -q '"state":"succeeded"' "$work/incr.json" || { cat "$work/incr.json" >&2; exit 1; }
incr=$(python3 -c "import json; print([o['label'] for o in json.load(open('$work/incr.json'))['outcomes']][0])")
conf=$lab/nodes/ap-northeast-1a/run/pgbackrest.conf
pgbr() {
  runuser -u postgres -- pgbackrest --config="$conf" --config-include-path="$(dirname "$conf")/pgbackrest/conf.d" \
    --stanza=lab --repo=2 --pg1-path="$restored" --log-level-console=error --log-level-file=off --type=immediate \
    --set="$incr" "$@" restore
}
t=$(now)
pgbr --delta
d=$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')
find "$restored" -mindepth 1 -delete
t=$(now)
pgbr
f=$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')
echo "restore of $incr (1% of the rows changed): delta ${d}s, full ${f}s, ratio $(awk -v a="$f" -v b="$d" 'BEGIN { printf "%.2f", a / b }') (delta's speed-up)"
