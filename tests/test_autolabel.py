"""Auto-labelling: exhaustive rule equivalence, the filter on a known cloud-shadow gradient, the runners
(pool, Dask local, Dask on the test SLURM cluster), failure reporting, resume, the CLI and the benchmark."""

import json, sys, time
from pathlib import Path

import cv2
import numpy as np
import pytest

from seaice_nb.autolabel import (
    AutolabelConfig,
    FilterConfig,
    RuleConfig,
    THICK,
    THIN,
    WATER,
    label_filtered,
    label_rgb,
    label_rgb_hsv,
    read_rgb,
)
from seaice_nb.autolabel.parallel import finished_tiles, read_manifest, run_autolabel
from seaice_nb.autolabel.s2synth import synthetic_scene, write_synthetic_scenes
from conftest import require


def all_colours(block: int) -> np.ndarray:
    "Block `block` (of 16) of all 256**3 RGB colours as a uint8 [256, 4096, 3] image."
    i = np.arange(block * 2**20, (block + 1) * 2**20, dtype=np.uint32)
    return np.stack([(i >> 16) & 255, (i >> 8) & 255, i & 255], -1).astype(np.uint8).reshape(256, 4096, 3)


@pytest.mark.parametrize(
    'rule', [RuleConfig(), RuleConfig(water_max=0, thick_min=2), RuleConfig(water_max=253, thick_min=255)]
)
def test_rule_equals_paper_hsv_on_every_rgb_value(rule):
    seen = np.zeros(3, np.int64)
    for block in range(16):
        img = all_colours(block)
        ours, paper = label_rgb(img, rule), label_rgb_hsv(img, rule)
        assert np.array_equal(ours, paper), f"block {block}: {np.argwhere(ours != paper)[:5]}"
        seen += np.bincount(ours.ravel(), minlength=3)[:3]
    assert seen.sum() == 256**3
    # the class of a colour is fixed by V = max(R, G, B): (V+1)^3 - V^3 colours have value V
    v = np.arange(256)
    per_v = (v + 1) ** 3 - v**3
    assert seen[WATER] == per_v[: rule.water_max + 1].sum() and seen[THICK] == per_v[rule.thick_min :].sum()


def shaded(seed: int, size: int = 768):
    "A clear synthetic scene lit by an illumination falling from 1 to 0.55 across it (a cloud-shadow gradient)."
    sc = synthetic_scene(seed, size, haze=0, shade=0)
    light = np.linspace(1.0, 0.55, size, dtype=np.float32)[None, :, None]
    return np.clip(sc.clean * light + 0.5, 0, 255).astype(np.uint8), sc.truth


@pytest.mark.parametrize('seed', [0, 1])
def test_filter_removes_shading_gradient(seed):
    rgb, truth = shaded(seed)
    before = (label_rgb(rgb) == truth).mean()
    after = (label_filtered(rgb) == truth).mean()
    after_off = (label_filtered(rgb, FilterConfig(otsu='off')) == truth).mean()
    assert before < 0.8, before
    assert after > before + 0.08, (before, after)
    assert after_off > 0.9 and after_off > before + 0.15, (before, after_off)
    # the unfiltered errors sit on the dark side: thick ice read as thin
    err = label_rgb(rgb) != truth
    assert err[:, -100:].mean() > 3 * err[:, :100].mean()


@pytest.fixture
def scenes(tmp_path):
    return write_synthetic_scenes(tmp_path / 'data', n=3, size=256, floe_scale=24)


def test_pool_reports_failures_and_resumes(tmp_path, scenes):
    gray = tmp_path / 'data' / 'images' / 'gray.png'
    cv2.imwrite(str(gray), np.zeros((128, 128), np.uint8))  # decodes, but is not RGB: fails in the worker
    corrupt = tmp_path / 'data' / 'images' / 'corrupt.png'
    corrupt.write_bytes(b'\x89PNG truncated')  # cannot even be planned
    cfg = AutolabelConfig(tile=64)
    out = tmp_path / 'out'
    rep = run_autolabel(
        [*scenes, gray, corrupt], out, cfg, runner='pool', workers=2, tiles_per_task=4, progress=False
    )
    assert rep.done == 48 and len(rep.failed) == 5
    errors = {r['tile_id']: r['error'] for r in rep.failed}
    assert 'corrupt' in errors and sum('expected an RGB image' in e for e in errors.values()) == 4
    assert len(finished_tiles(out)) == 48
    # lose a few finished tiles, as a kill between writing and recording would: the rerun redoes only those
    recs = read_manifest(out)
    lost = sorted(recs)[:5]
    for t in lost:
        if recs[t]['status'] == 'ok':
            (out / recs[t]['label']).unlink()
    gray.unlink()
    cv2.imwrite(str(gray), np.full((128, 128, 3), 200, np.uint8))  # fix the bad scene
    rep2 = run_autolabel([*scenes, gray], out, cfg, runner='pool', workers=2, progress=False)
    n_lost = sum(recs[t]['status'] == 'ok' for t in lost)
    assert rep2.done == n_lost + 4 and rep2.skipped == 48 - n_lost and not rep2.failed
    lab = cv2.imread(str(out / 'labels' / 'gray' / 'gray_y00064_x00064.png'), cv2.IMREAD_UNCHANGED)
    assert (lab == THIN).all()


def test_dask_local_matches_serial(tmp_path, scenes):
    cfg = AutolabelConfig(tile=128, apply_filter=True)
    a = run_autolabel(scenes, tmp_path / 'serial', cfg, runner='serial', progress=False)
    b = run_autolabel(
        scenes, tmp_path / 'dask', cfg, runner='dask', workers=2, tiles_per_task=2, progress=False
    )
    assert a.done == b.done == 12 and not b.failed
    for f in sorted((tmp_path / 'serial' / 'labels').rglob('*.png')):
        assert f.read_bytes() == (tmp_path / 'dask' / f.relative_to(tmp_path / 'serial')).read_bytes()


def test_dask_on_slurm(tmp_path, scenes, slurm_cluster, monkeypatch):
    require(
        __import__('importlib').util.find_spec('dask_jobqueue') is not None, 'dask_jobqueue is not installed'
    )
    monkeypatch.setenv('SLURM_CONF', str(slurm_cluster.conf))
    for k in [k for k in __import__('os').environ if k.startswith(('SLURM_JOB', 'SBATCH_'))]:
        monkeypatch.delenv(k)
    slurm = {
        'queue': slurm_cluster.partition,
        'cores': 1,
        'memory': '600MB',
        'walltime': '00:10:00',
        'log_directory': str(tmp_path / 'slurm-logs'),
        'scheduler_options': {'host': '127.0.0.1', 'dashboard_address': '127.0.0.1:0'},
        'worker_extra_args': ['--host', '127.0.0.1'],
        'wait_timeout': 120,
    }
    cfg = AutolabelConfig(tile=128)
    rep = run_autolabel(
        scenes, tmp_path / 'slurm', cfg, runner='slurm', workers=1, slurm=slurm, progress=False
    )
    assert rep.done == 12 and not rep.failed, rep.failed
    run_autolabel(scenes, tmp_path / 'serial', cfg, runner='serial', progress=False)  # the reference labels
    for f in sorted((tmp_path / 'serial' / 'labels').rglob('*.png')):
        assert f.read_bytes() == (tmp_path / 'slurm' / f.relative_to(tmp_path / 'serial')).read_bytes()


def test_cli(tmp_path, scenes, capsys):
    from seaice_nb.cli import main

    out = tmp_path / 'cli'
    assert (
        main(
            [
                'autolabel',
                *map(str, scenes),
                '--out',
                str(out),
                '--tile',
                '128',
                '--runner',
                'serial',
                '--quiet',
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['done'] == 12
    assert (
        main(
            ['autolabel', str(scenes[0]), '--out', str(out), '--tile', '64', '--runner', 'serial', '--quiet']
        )
        == 1
    )
    assert 'differs in tile' in capsys.readouterr().err
    assert (
        main(
            [
                'autolabel',
                str(tmp_path / 'missing.png'),
                '--out',
                str(tmp_path / 'm'),
                '--runner',
                'serial',
                '--quiet',
            ]
        )
        == 1
    )
    assert 'does not exist' in capsys.readouterr().err


def test_bench_runs_at_tiny_sizes(capsys):
    from seaice_nb.cli import main

    assert (
        main(
            [
                'bench',
                'autolabel',
                '--size',
                '256',
                '--tile',
                '64',
                '--scenes',
                '2',
                '--scene-size',
                '128',
                '--repeat',
                '1',
                '--runners',
                'pool,dask',
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r['labeller']['mpx_s_per_core'] > 0 and r['labeller']['paper_hsv_per_tile_mpx_s'] > 0
    assert r['filter']['median155_cv2_s'] > 0
    for runner in ('pool', 'dask'):
        assert set(r['parallel'][runner]) == {'1', '2'} and r['parallel'][runner]['1']['speedup'] == 1.0
