#!/usr/bin/env bash
# Stops the API, the worker and the local Postgres cluster started by up.sh.
source "$(dirname "$0")/lib.sh"
for p in api worker; do
  f="$RUN_DIR/$p.pid"
  if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
done
pg_stop
log "down"
