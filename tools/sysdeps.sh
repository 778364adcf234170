#!/usr/bin/env bash
# System packages some tests need: headless Chromium (docs site), SLURM + munge (cluster tests).
# Installed with apt when running as root; otherwise the tests that need them skip with a reason
# (in CI, where CI=true, they fail instead).
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && { echo "sysdeps: chromium, slurm and munge present"; exit 0; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "sysdeps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
    echo "sysdeps: apt-get install ${need[*]} failed" >&2; [ "${CI:-}" = true ] && exit 1; exit 0; }
else
  echo "sysdeps: missing ${need[*]} (not root or no apt): the tests that need them will skip"
  [ "${CI:-}" = true ] && exit 1
fi
exit 0
