#!/usr/bin/env bash
# Build the documentation site from the notebooks into _docs/ (make docs).
# Never installs anything and never calls sudo: with Quarto on PATH it renders with Quarto, without it
# with smalldocs (pure Python, in .venv). The steps are in tools/docs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" tools/docs.py "$@"
