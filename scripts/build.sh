#!/usr/bin/env bash
# Installs what is missing and builds everything (native shim + .NET solution, Release).
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
ensure_packages
build_native
dotnet build Service.sln -c Release -nologo -v q -clp:ErrorsOnly
