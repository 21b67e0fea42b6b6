#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: installs PostgreSQL from Debian when missing, starts a
# server on 127.0.0.1:$SORTIE_PG_PORT (54329) with its data under /tmp (trust auth on loopback only),
# creates the database sortie_test, and prints its URL on stdout (all else goes to stderr):
#
#     postgresql://postgres@127.0.0.1:54329/sortie_test
#
# Idempotent: a server already running on that data dir is reused, so a second run takes well under a
# second. `.ci/postgres.sh stop` stops the server (its data dir stays, for the next start).
set -euo pipefail

PORT="${SORTIE_PG_PORT:-54329}"
BASE="/tmp/sortie-pg-$PORT"
DATA="$BASE/data"
LOG="$BASE/server.log"
DB=sortie_test
URL="postgresql://postgres@127.0.0.1:$PORT/$DB"

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

pg_bindir() {
    # The newest installed server (Debian: /usr/lib/postgresql/<major>/bin); else initdb on PATH.
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
        echo "$dir"
    elif command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v initdb)"
    fi
}

install_postgres() {
    command -v apt-get >/dev/null || die "PostgreSQL (initdb, pg_ctl) is not installed, and there is no apt-get"
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || die "PostgreSQL is not installed; installing it needs root (or sudo)"
        sudo=(sudo -n)
    fi
    say "installing PostgreSQL from Debian (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q postgresql postgresql-contrib; } >&2 \
        || die "apt-get could not install postgresql"
}

BIN="$(pg_bindir)"
if [[ "${1:-}" == stop ]]; then
    [[ -n "$BIN" && -f "$DATA/postmaster.pid" ]] || { say "no server on $DATA"; exit 0; }
fi
if [[ -z "$BIN" ]]; then
    install_postgres
    BIN="$(pg_bindir)"
    [[ -n "$BIN" ]] || die "PostgreSQL was installed but initdb/pg_ctl are not found under /usr/lib/postgresql"
fi

# initdb and the server refuse to run as root: run them as `postgres` (Debian's package makes it).
RUN=()
OWNER="$(id -un)"
if [[ "$(id -u)" == 0 ]]; then
    getent passwd postgres >/dev/null || die "running as root, but there is no 'postgres' user to run the server as"
    RUN=(runuser -u postgres --)
    OWNER=postgres
fi

mkdir -p "$BASE"
# One run at a time (e.g. parallel test sessions); the lock goes with this process (never given to the server).
exec 9>"$BASE.lock"
flock -w 120 9 || die "another postgres.sh holds $BASE.lock"

if [[ "${1:-}" == stop ]]; then
    "${RUN[@]}" "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2 || true
    exit 0
fi

psql_() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

if ! "${RUN[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    if [[ ! -f "$DATA/PG_VERSION" ]]; then
        # Fresh (or a half-made one from an interrupted run): make a new cluster.
        rm -rf "$DATA"
        mkdir -p "$DATA"
        chown "$OWNER" "$BASE" "$DATA"
        chmod 700 "$DATA"
        "${RUN[@]}" "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
            >"$BASE/initdb.log" 2>&1 || { cat "$BASE/initdb.log" >&2; die "initdb failed"; }
        # Loopback only, trust: a throwaway server for tests.
        cat >"$DATA/pg_hba.conf" <<'EOF'
local   all  all                trust
host    all  all  127.0.0.1/32  trust
host    all  all  ::1/128       trust
EOF
        chown "$OWNER" "$DATA/pg_hba.conf"
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT is taken by another program; set SORTIE_PG_PORT to a free port"
    fi
    touch "$LOG" && chown "$OWNER" "$LOG"
    # Durability off: nothing here outlives the tests.
    opts="-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off"
    opts+=" -c synchronous_commit=off -c full_page_writes=off"
    "${RUN[@]}" "$BIN/pg_ctl" -D "$DATA" -o "$opts" -l "$LOG" -w -t 60 start >&2 9>&- \
        || { tail -n 20 "$LOG" >&2; die "the server did not start (log: $LOG)"; }
fi

for _ in $(seq 50); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && break
    sleep 0.1
done
if [[ "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
    psql_ -d postgres -c "CREATE DATABASE $DB" >&2 || die "could not create database $DB"
fi
psql_ -d "$DB" -tAc "SELECT 1" >/dev/null || die "cannot connect to $URL (log: $LOG)"
echo "$URL"
