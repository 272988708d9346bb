#!/usr/bin/env bash
# Packs what a GPU host without a .NET SDK needs to run our worker or tests: the .NET runtime (host + the
# Microsoft.NETCore.App shared framework, ~26 MB as tar.xz) and the framework-dependent builds. Output: .device/
# (git-ignored; or the folder given as the first argument). The native shim is NOT packed: it is built on the GPU
# host against that host's libtorch (run.sh).
source "$(dirname "$0")/../lib.sh"
cd "$REPO_ROOT"
out="$(realpath -m "${1:-$REPO_ROOT/.device}")"
rm -rf "$out"; mkdir -p "$out"
dotnet_root="$(dirname "$(readlink -f "$(command -v dotnet)")")"
fx="$(ls -d "$dotnet_root"/shared/Microsoft.NETCore.App/* | sort -V | tail -1)"
log "packing the .NET runtime $(basename "$fx")"
tar -C "$dotnet_root" -cJf "$out/dotnet-runtime.tar.xz" dotnet host "shared/Microsoft.NETCore.App/$(basename "$fx")"
log "publishing the worker and the worker tests (framework-dependent)"
dotnet publish src/Worker/Worker.csproj -c Release -o "$out/worker" -nologo -v q
dotnet publish tests/Worker.Tests/Worker.Tests.csproj -c Release -o "$out/worker-tests" -nologo -v q
rm -f "$out"/worker/libfinetune_torch.so "$out"/worker-tests/libfinetune_torch.so
du -sh "$out"/* >&2
