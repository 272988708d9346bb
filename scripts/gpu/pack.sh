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
# What travels must stay small (the device carry limit): drop what a Linux x64 run never loads (code-coverage
# tooling, other platforms' native folders, the test platform's translations) ...
for d in "$out/worker" "$out/worker-tests"; do
  (cd "$d" && rm -rf CodeCoverage x86 x64 arm64 alpine ubuntu macos runtimes/win cs de es fr it ja ko pl pt-BR ru tr zh-Hans zh-Hant)
done
# ... and the test folder's copies of the worker's own files: run.sh puts them back from worker/ on the GPU host.
: > "$out/worker-tests/.from-worker"
for f in "$out"/worker/*; do
  b="$(basename "$f")"
  if [ -f "$f" ] && [ -f "$out/worker-tests/$b" ] && cmp -s "$f" "$out/worker-tests/$b"; then
    rm "$out/worker-tests/$b"; echo "$b" >> "$out/worker-tests/.from-worker"
  fi
done
du -sh "$out"/* >&2
total=$(du -sm "$out" | cut -f1)
log "packed $total MB into $out"
[ "$total" -le 60 ] || log "WARNING: $total MB is more than the 60 MB that may travel to the GPU host"
