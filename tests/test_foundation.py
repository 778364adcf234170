"""The project's own machinery: notebook/library sync check, README generation, config errors, CLI."""

import os, shutil, subprocess, sys, textwrap
from dataclasses import dataclass, field
from pathlib import Path
import pytest, yaml

from seaice_nb.core import ConfigError, MissingFileError, load_config, make_run_dir
from seaice_nb.cli import main as cli_main

BIN = Path(sys.executable).parent


def _copy_repo(repo: Path, dst: Path) -> Path:
    "The repository as git would commit it (the index), like CI's clean clone."
    dst.mkdir(parents=True)
    subprocess.run(['git', 'checkout-index', '--all', f'--prefix={dst}/'], cwd=repo, check=True)
    return dst


def test_sync_check_catches_hand_edit(repo, tmp_path):
    "A deliberate edit of an exported .py makes the CI sync check fail, and the check restores the file."
    clone = _copy_repo(repo, tmp_path / 'clone')
    ok = subprocess.run(['bash', 'tools/check_sync.sh', str(BIN)], cwd=clone, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    core = clone / 'seaice_nb' / 'core.py'
    original = core.read_text()
    core.write_text(
        original.replace('"Base class of every error seaice_nb raises on purpose."', '"edited by hand"')
    )
    bad = subprocess.run(['bash', 'tools/check_sync.sh', str(BIN)], cwd=clone, capture_output=True, text=True)
    assert bad.returncode == 1 and 'edited without its notebook' in bad.stdout
    assert 'edited by hand' in core.read_text()  # the check reports, it does not silently repair


def test_readme_is_generated_from_index(repo):
    r = subprocess.run(
        [sys.executable, 'tools/readme.py', '--check'], cwd=repo, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout


def test_readme_names_two_commands_and_ci_runs_the_test_one(repo):
    readme = (repo / 'README.md').read_text()
    assert 'make demo' in readme and 'make test' in readme
    ci = (repo / '.ci' / 'run').read_text().splitlines()
    assert ci[-1].strip() == 'make test'


@dataclass
class Optim:
    lr: float = 1e-3


@dataclass
class Train:
    epochs: int = 1
    channels: list[str] = field(default_factory=lambda: ['hh'])
    optim: Optim = field(default_factory=Optim)


def test_yaml_errors_name_key_and_file(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('epochs: 2\noptim:\n  lr: 0.1\n')
    assert load_config(f, Train).optim.lr == 0.1
    f.write_text('epochs: 2\noptim:\n  lrate: 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate'.*known keys: lr.*p.yaml"):
        load_config(f, Train)
    f.write_text('epochs: two\n')
    with pytest.raises(ConfigError, match=r"epochs: expected an integer, got 'two' \(in .*p.yaml\)"):
        load_config(f, Train)
    f.write_text('epochs: [1\n')
    with pytest.raises(ConfigError, match='is not valid YAML'):
        load_config(f, Train)
    f.write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must hold a mapping'):
        load_config(f, Train)
    with pytest.raises(MissingFileError, match='missing.yaml'):
        load_config(tmp_path / 'missing.yaml', Train)
    with pytest.raises(ConfigError, match='optim.lr: expected a number'):
        load_config({}, Train, {'optim.lr': 'fast'})


def test_named_presets_resolve_from_config_dir(tmp_path, monkeypatch):
    (tmp_path / 'small.yaml').write_text('epochs: 3\n')
    monkeypatch.setenv('SEAICE_CONFIG_DIR', str(tmp_path))
    assert load_config('small', Train).epochs == 3
    with pytest.raises(MissingFileError, match="no preset named 'big'.*known presets: .*small"):
        load_config('big', Train)


def test_run_dir_resume_refuses_other_config(tmp_path):
    r = make_run_dir('exp', Train(), root=tmp_path, date='2026-01-02')
    assert yaml.safe_load((r / 'config.yaml').read_text())['epochs'] == 1
    with pytest.raises(ConfigError, match='differs in epochs'):
        make_run_dir('exp', Train(epochs=5), root=tmp_path, date='2026-01-02', resume=True)


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli_main(['config', str(tmp_path / 'none.yaml')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('seaice: error:') and 'Traceback' not in err
    r = subprocess.run([str(BIN / 'seaice'), '--version'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith('seaice_nb ')
