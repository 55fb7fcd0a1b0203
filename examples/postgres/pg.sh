#!/bin/sh
# Runs a PostgreSQL server program (postgres, initdb) from Debian's layout, where they live in
# /usr/lib/postgresql/VERSION/bin and not on PATH: the newest version installed.
tool=$1; shift
for bin in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) /usr/local/bin /usr/bin; do
    [ -x "$bin/$tool" ] && exec "$bin/$tool" "$@"
done
echo "pg.sh: $tool not found (apt-get install postgresql)" >&2
exit 127
