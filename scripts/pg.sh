#!/usr/bin/env bash
# Start (default) or stop the project's local Postgres cluster: scripts/pg.sh [start|stop]
source "$(dirname "$0")/lib.sh"
case "${1:-start}" in
  start) ensure_packages; pg_start; echo "FINETUNE_PG=$FINETUNE_PG";;
  stop) pg_stop;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2;;
esac
