#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what is missing (apt: postgresql, libtorch-dev,
# cmake, g++), starts the project's local Postgres cluster, builds the native libtorch shim, runs `dotnet test`.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
ensure_packages
pg_start
log "building the native libtorch shim"
build_native
log "building the solution"
dotnet build Service.sln -c Release -nologo -v q -clp:ErrorsOnly
mkdir -p "$RUN_DIR/test-results"; rm -f "$RUN_DIR"/test-results/*.trx
log "running the tests"
set +e
dotnet test Service.sln -c Release --no-build -nologo -v q \
  --logger "trx" --logger "console;verbosity=normal" --results-directory "$RUN_DIR/test-results" "$@"
rc=$?
set -e
# One plain summary line over every test assembly, for people and for CI.
python3 - "$RUN_DIR/test-results" <<'PY' || true
import sys, glob, xml.etree.ElementTree as ET
ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
p = f = s = 0
for path in glob.glob(sys.argv[1] + "/*.trx"):
    c = ET.parse(path).getroot().find("t:ResultSummary/t:Counters", ns)
    if c is None: continue
    p += int(c.get("passed", 0)); f += int(c.get("failed", 0)) + int(c.get("error", 0)) + int(c.get("timeout", 0))
    # xunit's trx leaves notExecuted at 0: skipped tests are total minus executed.
    s += int(c.get("total", 0)) - int(c.get("executed", 0))
print(f"{p} passed, {f} failed, {s} skipped")
PY
exit $rc
