#!/usr/bin/env bash
# Fail when nbdev_export would change the library (a .py edited without its notebook).
# Leaves the library exactly as it found it. Usage: tools/check_sync.sh [BIN_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-${VENV:-.venv}/bin}
snap=$(mktemp -d); cp -r seaice_nb "$snap/"
"$BIN/nbdev_export" || { echo "FAIL: nbdev_export errored"; rm -rf "$snap"; exit 1; }
if ! diff -r -x __pycache__ "$snap/seaice_nb" seaice_nb; then
  echo "FAIL: nbdev_export changed seaice_nb/ — a library file was edited without its notebook."
  echo "      Edit the notebook (or run nbdev_update) and export again. The library was restored as it was."
  rm -rf seaice_nb && cp -r "$snap/seaice_nb" seaice_nb; rm -rf "$snap"; exit 1
fi
rm -rf "$snap"; echo "ok: nbdev_export leaves seaice_nb/ unchanged"
