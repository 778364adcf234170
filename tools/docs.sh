#!/usr/bin/env bash
# Build the documentation site from the notebooks into _docs/ (make docs).
# With Quarto installed: nbdev_docs. Without it: nbdev_proc_nbs + smalldocs (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
if command -v quarto >/dev/null 2>&1; then
  "$BIN/nbdev_docs"
else
  rm -rf _proc _docs
  "$BIN/nbdev_proc_nbs" >/dev/null
  cp nbs/styles.css _proc/ 2>/dev/null || true
  mkdir -p _proc/docs && cp -r docs/images _proc/docs/  # figures the index (README) shows
  "$BIN/smalldocs" render --quiet _proc
  mv _proc/_docs _docs
fi
echo "docs site: $(pwd)/_docs/index.html"
