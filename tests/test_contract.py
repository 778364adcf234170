"""The typed contract from preset to checkpoint: one config for data and model sizes whichever way a run is
started (`seaice train` or the papermill notebook), the import structure (no cycles, the trainer light),
the trackers, and a command line that refuses bad values without leaving files behind."""

import ast, json, os, subprocess, sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PY = sys.executable
PRESETS = sorted(
    p.stem
    for p in (REPO / 'configs').glob('*.yaml')
    if (yaml.safe_load(p.read_text()) or {}).get('kind') == 'train'
)


@pytest.fixture(scope='module')
def small_store(tmp_path_factory):
    "Four tiny synthetic scenes preprocessed at 4x with 3-frame stacks, and an official-style split."
    from seaice_nb.data import splits
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess
    from seaice_nb.data.synth import generate_scenes

    tmp = tmp_path_factory.mktemp('contract')
    generate_scenes(tmp / 'scenes', 4, seed=3, size=(160, 200), progress=False)
    preprocess(
        tmp / 'scenes',
        tmp / 'store.zarr',
        PreprocessConfig(factor=4, max_frames=3, chunk=64),
        workers=0,
        progress=False,
    )
    m = splits.official_split(splits.store_records(tmp / 'store.zarr')[0], n_val=1, seed=0)
    splits.save_manifest(m, tmp / 'split.json')
    return tmp


def seaice(*args, cwd=None, check=True):
    r = subprocess.run(
        [str(Path(PY).parent / 'seaice'), *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, (
            f"seaice {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    return r


def test_every_train_preset_is_listed():
    assert PRESETS == ['tsvit_v1', 'tsvit_v2', 'tsvit_v3', 'tsvit_v3_pixel', 'unet_baseline', 'unet_winner']


@pytest.mark.parametrize('preset', PRESETS)
def test_cli_and_papermill_resolve_the_same_config(preset, small_store, tmp_path):
    "`seaice train PRESET --dry-run` and `papermill train.ipynb -p dry_run True` save the same config.yaml and model sizes."
    from seaice_nb.core import load_config
    from seaice_nb.training.runs import TrainConfig, build_model
    from seaice_nb.workflows import run_notebook

    store, split = small_store / 'store.zarr', small_store / 'split.json'
    # the notebook sets these knobs from its parameters; the command line names them as overrides
    out = seaice(
        'train',
        preset,
        '--dry-run',
        '--run-dir',
        tmp_path / 'cli',
        '-o',
        f'data.store={store}',
        '-o',
        f'data.splits={split}',
        '-o',
        'data.crop=32',
        '-o',
        'data.tile=32',
        '-o',
        'seed=0',
        '-o',
        'device=auto',
        '-o',
        'num_workers=0',
    ).stdout
    printed = json.loads(out.strip().splitlines()[-1])
    run_notebook(
        'train',
        tmp_path / 'nb',
        {'preset': preset, 'store': store, 'split': split, 'crop': 32, 'dry_run': True},
        progress=False,
    )
    cli_cfg = yaml.safe_load((tmp_path / 'cli' / 'config.yaml').read_text())
    nb_cfg = yaml.safe_load((tmp_path / 'nb' / 'config.yaml').read_text())
    assert cli_cfg == nb_cfg
    kw = cli_cfg['model_kwargs']
    assert kw == printed['model_kwargs'] and kw['in_chans'] == len(cli_cfg['data']['channels'] or range(18))
    assert ('img_size' in kw) == preset.startswith('tsvit') and kw.get('img_size', 32) == 32
    assert ('amsr2_chans' in kw) == (preset == 'tsvit_v3')
    assert not (tmp_path / 'cli' / 'checkpoints').exists()  # a dry run trains nothing
    model = build_model(
        load_config(tmp_path / 'nb' / 'config.yaml', TrainConfig)
    )  # the saved config rebuilds the model
    assert sum(p.numel() for p in model.parameters()) == printed['parameters']


def _imports(path: Path, package: str = 'seaice_nb') -> set[str]:
    "seaice_nb modules imported anywhere in `path` (module level or deferred inside functions)."
    mod = '.'.join(path.relative_to(REPO).with_suffix('').parts)
    if mod.endswith('.__init__'):
        mod = mod[:-9]
    pkg = mod if path.name == '__init__.py' else mod.rsplit('.', 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = pkg.split('.')
                base = '.'.join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split('.')[0] == package}
    return out


def test_no_module_imports_one_that_imports_it_back():
    files = {
        '.'.join(p.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__'): p
        for p in (REPO / 'seaice_nb').rglob('*.py')
        if p.name != '_modidx.py'
    }
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    graph = {
        m: {i for i in deps if not m.startswith(i + '.')} for m, deps in graph.items()
    }  # a package's own __init__
    cycles = []

    def visit(m, path):
        for d in graph[m]:
            if d in path:
                cycles.append(path[path.index(d) :] + [d])
            elif len(path) < 12:
                visit(d, path + [d])

    for m in graph:
        visit(m, [m])
    assert not cycles, f"import cycles: {sorted({' -> '.join(c) for c in cycles})[:5]}"


def test_importing_the_trainer_pulls_in_neither_plots_nor_evaluate():
    code = 'import sys, seaice_nb.training.trainer; print(" ".join(m for m in sys.modules if m.startswith("seaice_nb")))'
    mods = subprocess.run(
        [PY, '-c', code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    assert 'seaice_nb.training.trainer' in mods and 'seaice_nb.training.runs' in mods
    assert 'seaice_nb.viz.plots' not in mods and 'seaice_nb.evaluation.evaluate' not in mods, mods


def test_mlflow_tracker_logs_to_a_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    import mlflow
    from seaice_nb.core import to_dict
    from seaice_nb.training.runs import Tracker, TrainConfig, read_metrics

    png = tmp_path / 'curve.png'
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(png)
    plt.close(fig)
    t = Tracker(tmp_path, 'mlflow', to_dict(TrainConfig(lr=0.003)))
    t.log({'loss': 0.5}, step=1, epoch=1, split='train')
    t.log({'loss': 0.25, 'combined': 61.5}, step=2, epoch=1, split='val')
    t.artifact(png)
    t.close()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name('seaice_nb').experiment_id])[0]
    assert run.data.params['lr'] == '0.003' and run.data.params['data.crop'] == '256'
    assert [m.value for m in client.get_metric_history(run.info.run_id, 'val/combined')] == [61.5]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ['curve.png']
    assert len(read_metrics(tmp_path)) == 3  # metrics.csv is written whatever the backend


def cli(capsys, *args) -> tuple[int, str, str]:
    "Run the `seaice` command in this process (as the console script does); exit code, stdout and stderr."
    from seaice_nb import cli as seaice_cli

    capsys.readouterr()
    try:
        rc = seaice_cli.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code  # argparse errors
    out, err = capsys.readouterr()
    return rc, out, err


def test_config_refuses_unknown_models_and_bad_values(capsys):
    rc, _, err = cli(capsys, 'config', 'tsvit_v2', '-o', 'model=foo')
    assert rc != 0 and "model 'foo' is not a registered preset" in err
    rc, _, err = cli(capsys, 'config', 'tsvit_v2', '-o', 'steps_per_epoch=0')
    assert rc != 0 and 'steps_per_epoch must be >= 1' in err
    rc, _, err = cli(capsys, 'config', 'tsvit_v2', '-o', 'data.patch_size=64')
    assert rc != 0 and "was renamed to 'crop'" in err
    rc, out, _ = cli(capsys, 'config', 'tsvit_v2', '-o', 'data.crop=128')
    assert rc == 0 and 'crop: 128' in out


def test_failed_commands_leave_nothing_in_the_working_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, 'evaluate', tmp_path / 'no_such_run')
    assert rc != 0 and 'neither a checkpoint file nor a run directory' in err
    rc, _, err = cli(
        capsys, 'train', 'unet_baseline', '-o', 'data.store=nowhere.zarr', '--run-dir', tmp_path / 'r'
    )
    assert rc != 0 and 'nowhere.zarr' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_version():
    from seaice_nb import __version__

    assert seaice('--version').stdout.strip() == f"seaice_nb {__version__}"


def _parsers() -> dict:
    "The argparse parser of every `seaice` subcommand and benchmark, captured where the command parses its arguments."
    import argparse
    from unittest import mock
    from seaice_nb import cli as seaice_cli

    class Captured(Exception):
        pass

    def grab(self, *args, **kwargs):
        raise Captured(self)

    table = {**seaice_cli.COMMANDS, **{f"bench {k}": v for k, v in seaice_cli.BENCHES.items()}}
    out = {}
    with (
        mock.patch.object(argparse.ArgumentParser, 'parse_args', grab),
        mock.patch.object(argparse.ArgumentParser, 'parse_known_args', grab),
    ):
        for name, (target, _) in table.items():
            try:
                seaice_cli._resolve(target)([])
            except Captured as e:
                out[name] = e.args[0]
    return out


def test_one_command_line_vocabulary():
    "-o is only --override, outputs are --out, --quiet turns progress off, and every option says what it does."
    parsers = _parsers()
    assert {'train', 'evaluate', 'preprocess', 'autolabel', 'download', 'bench model'} <= set(parsers)
    problems = []
    for name, p in sorted(parsers.items()):
        for act in p._actions:
            opts = set(act.option_strings)
            if '-h' in opts:
                continue
            if not act.help:
                problems.append(f"seaice {name}: {'/'.join(act.option_strings) or act.dest} has no help")
            if '-o' in opts and act.dest != 'override':
                problems.append(f"seaice {name}: -o means --{act.dest}, not --override")
            for bad, good in (
                ('--dest', '--out'),
                ('--output', '--out'),
                ('--no-progress', '--quiet'),
                ('--out-dir', '--out'),
            ):
                if bad in opts:
                    problems.append(f"seaice {name}: {bad} should be {good}")
    assert not problems, '\n'.join(problems)
