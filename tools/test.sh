#!/usr/bin/env bash
# The test suite (make test): library/notebook sync, clean notebooks, notebook tests, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
start=$(date +%s)
fail=0
step() { echo; echo "== $* =="; }

[ "${SEAICE_SKIP_SYSDEPS:-}" = 1 ] || bash tools/sysdeps.sh || fail=1

step "nbdev_export changes nothing (notebooks are the source of truth)"
bash tools/check_sync.sh "$BIN" || fail=1

step "README.md is generated from nbs/index.ipynb"
"$BIN/python" tools/readme.py --check || fail=1

step "nbdev_clean changes nothing"
snap=$(mktemp -d); cp -r nbs "$snap/"
"$BIN/nbdev_clean" || { echo "FAIL: nbdev_clean errored"; fail=1; }
if ! diff -r "$snap/nbs" nbs >/dev/null; then
  echo "FAIL: nbdev_clean would change these notebooks (run make clean-nbs and commit):"
  diff -rq "$snap/nbs" nbs; rm -rf nbs && cp -r "$snap/nbs" nbs; fail=1
fi
rm -rf "$snap"

step "ruff: notebooks, tests and tools formatted; everything lint-clean"
if ! "$BIN/ruff" format --check --quiet nbs tests tools setup.py; then
  echo "FAIL: run 'make format' (ruff format on the notebooks, then nbdev_export) and commit"; fail=1
fi
"$BIN/ruff" check --quiet || { echo "FAIL: ruff check"; fail=1; }

step "nbdev_test (notebook examples)"
t0=$(date +%s)
"$BIN/nbdev_test" --n_workers 2 --timing || { echo "FAIL: nbdev_test"; fail=1; }
echo "nbdev_test took $(( $(date +%s) - t0 )) s"

step "pytest"
# fixtures of seaice_nb.testing.fixtures (scenes, store, tiny runs), built once per code version and shared by the workers
export SEAICE_NB_TEST_CACHE="${SEAICE_NB_TEST_CACHE:-$PWD/.pytest_cache/seaice_nb-fixtures}"
t0=$(date +%s)
# two workers, a test file each at a time: much of the suite waits on kernels, SLURM, browsers and servers
"$BIN/python" -m pytest tests -ra --durations=15 -n "${SEAICE_TEST_WORKERS:-2}" --dist loadfile "$@"; rc=$?
[ $rc -ne 0 ] && { echo "FAIL: pytest exited $rc"; fail=1; }
echo "pytest took $(( $(date +%s) - t0 )) s"

echo; echo "== test suite wall time: $(( $(date +%s) - start )) s =="
[ $fail -eq 0 ] && echo "ALL CHECKS PASSED" || echo "SOME CHECKS FAILED"
exit $fail
