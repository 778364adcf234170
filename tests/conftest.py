"""Shared pytest fixtures and helpers for seaice_nb's integration tests."""

import os, shutil
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')
# the official AI4Arctic scene lists, committed unchanged (their md5s are recorded in scenes.meta.json)
SCENE_LISTS = REPO / 'data_manifest'


def require(condition: bool, reason: str):
    """Skip the test when `condition` is false — except in CI, where the missing piece is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_tool(name: str, package: str | None = None) -> str:
    """Path of the command `name`; skip (fail in CI) naming the Debian package that provides it."""
    path = shutil.which(name)
    require(
        path is not None,
        f"{name} not found: install the Debian package {package or name} (tools/sysdeps.sh does)",
    )
    return path


@pytest.fixture(scope='session')
def repo() -> Path:
    return REPO


from slurm_cluster import slurm_cluster  # noqa: E402,F401  session fixture: a private single-node SLURM cluster
