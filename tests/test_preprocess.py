"""Preprocessing end to end on synthetic scenes: store layout, validation, stacking geometry, resume after SIGKILL,
corrupt scenes, Dask, and the CLI."""

import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from seaice_nb.data.preprocess import (
    PreprocessConfig,
    done_scenes,
    find_scenes,
    preprocess,
    scene_frame,
    validate_store,
    main as preprocess_main,
)
from seaice_nb.data import stack
from seaice_nb.data.synth import generate_scenes

CFG = PreprocessConfig(factor=2, max_frames=3, max_days=10, chunk=64)
SIZE = (200, 240)


@pytest.fixture(scope='module')
def scenes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('scenes')
    generate_scenes(d, 5, seed=3, size=SIZE, test_fraction=0.2, progress=False)
    return d


@pytest.fixture(scope='module')
def store(scenes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('pp') / 'store.zarr'
    summary = preprocess(scenes_dir, out, CFG, workers=2, progress=False)
    return out, summary


def test_end_to_end_and_validation(scenes_dir, store):
    out, s = store
    names = sorted(p.name.replace('_prep.nc', '') for p in find_scenes(scenes_dir))
    assert s['failed'] == {} and sorted(s['written']) == names
    assert sorted(done_scenes(out)) == names
    assert validate_store(out, scenes_dir) == []
    stacked = 0
    for n in names:
        ds = xr.open_zarr(out / n, consolidated=False)
        assert ds['image'].dims == ('time', 'channel', 'y', 'x') and ds['image'].dtype == np.float32
        assert (ds.sizes['y'], ds.sizes['x']) == (SIZE[0] // 2, SIZE[1] // 2)
        assert ds.sizes['yc'] == -(-ds.sizes['y'] // CFG.coarse_factor)
        assert ds['days_before'].values[-1] == 0 and ds['source'].values[-1] == n
        db = ds['days_before'].values
        assert (np.diff(db) <= 0).all() and db.max() <= CFG.max_days
        assert ds['lat'].attrs['standard_name'] == 'latitude' and 'md5' not in ds.attrs
        assert n + '_prep.nc' in json.loads(ds.attrs['seaice:sources'])
        stacked += ds.sizes['time'] > 1
        ds.close()
    assert stacked >= 1, 'synthetic passes over days should give at least one stack'


def test_validation_catches_a_changed_store(scenes_dir, store, tmp_path):
    out, _ = store
    copy = tmp_path / 'copy.zarr'
    shutil.copytree(out, copy)
    name = done_scenes(copy)[0]
    import zarr

    g = zarr.open_group(copy / name, mode='r+')
    sic = g['sic'][...]
    sic[0, 0] = (int(sic[0, 0]) + 1) % 11
    g['sic'][...] = sic
    assert any(p.startswith(f'{name}: sic differs') for p in validate_store(copy, scenes_dir))


def test_scene_stacked_onto_itself_is_identity(scenes_dir):
    f = scene_frame(find_scenes(scenes_dir)[0], CFG, charts=False)
    s = stack.stack_frames(f, [(f, 0.5)])
    assert (s['valid'][0] == f['valid']).all()
    np.testing.assert_allclose(s['image'][0][:, f['valid']], f['image'][:, f['valid']], atol=1e-3)


def test_shifted_copy_lands_where_it_should(scenes_dir):
    f = scene_frame(find_scenes(scenes_dir)[1], CFG, charts=False)
    dy, dx = 7, 11  # the earlier frame's grid starts 7 rows and 11 columns into the target's
    src = dict(
        f,
        image=f['image'][:, dy:, dx:],
        valid=f['valid'][dy:, dx:],
        lat=f['lat'][dy:, dx:],
        lon=f['lon'][dy:, dx:],
    )
    im, ok = stack.reproject(src['image'], src['valid'], src['lat'], src['lon'], f['lat'], f['lon'])
    assert not ok[:dy].any() and not ok[:, :dx].any()
    both = ok[dy:, dx:] & f['valid'][dy:, dx:]
    assert both.mean() > 0.5
    np.testing.assert_allclose(im[:, dy:, dx:][:, both], f['image'][:, dy:, dx:][:, both], atol=2e-3)


def test_resume_after_sigkill(scenes_dir, tmp_path):
    out = tmp_path / 'killed.zarr'
    cmd = [
        sys.executable,
        '-c',
        'import sys; from seaice_nb.data.preprocess import main; sys.exit(main(sys.argv[1:]))',
        str(scenes_dir),
        str(out),
        '--workers',
        '0',
        '--quiet',
        '-o',
        'factor=2',
        '-o',
        'chunk=64',
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if out.exists() and len(done_scenes(out)) >= 1:
            break
        time.sleep(0.02)
    assert p.poll() is None, f"finished before it could be killed: {p.communicate()}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = done_scenes(out)
    n = len(find_scenes(scenes_dir))
    assert 1 <= len(before) < n
    # nothing half-written looks done, and every finished group reopens
    for name in before:
        xr.open_zarr(out / name, consolidated=False).load()
    cfg = PreprocessConfig(factor=2, chunk=64)
    s = preprocess(scenes_dir, out, cfg, workers=0, progress=False)
    assert sorted(s['skipped']) == sorted(before)
    assert len(s['written']) == n - len(before) and not set(s['written']) & set(before)
    assert len(done_scenes(out)) == n and validate_store(out, scenes_dir, check_md5=False) == []


def test_corrupt_scene_is_reported_and_skipped(scenes_dir, tmp_path, capsys):
    src = tmp_path / 'src'
    src.mkdir()
    files = find_scenes(scenes_dir)[:3]
    for f in files:
        shutil.copy(f, src / f.name)
    for f in scenes_dir.glob('*_reference.nc'):
        shutil.copy(f, src / f.name)
    bad = src / files[1].name
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated download
    (src / '20200101T000000_dmi_prep.nc').write_bytes(b'not a netcdf file')
    rc = preprocess_main([str(src), str(tmp_path / 'c.zarr'), '--workers', '0', '--quiet', '-o', 'factor=2'])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert set(out['failed']) == {files[1].name, '20200101T000000_dmi_prep.nc'}
    assert out['written'] == 2


def test_dask_client(scenes_dir, tmp_path):
    distributed = pytest.importorskip('distributed')
    files = find_scenes(scenes_dir)[:2]
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        s = preprocess(
            files,
            tmp_path / 'd.zarr',
            PreprocessConfig(factor=2, max_frames=1),
            client=client,
            progress=False,
        )
    assert s['failed'] == {} and len(s['written']) == 2


def test_cli_registered(tmp_path, capsys):
    from seaice_nb.cli import COMMANDS, BENCHES, main

    assert COMMANDS['preprocess'][0] == 'seaice_nb.data.preprocess:main'
    assert BENCHES['loader'][0] == 'seaice_nb.bench.loader:main'
    assert main(['preprocess', str(tmp_path / 'nowhere'), str(tmp_path / 'o.zarr')]) == 1
    assert 'neither a scene file nor a folder' in capsys.readouterr().err


def test_bench_preprocess_tiny(capsys):
    "`seaice bench preprocess` at a tiny size: the JSON has every way, each scene read once, the ratios and the extrapolation."
    from seaice_nb.cli import main

    assert main(['bench', 'preprocess', '--size', '100', '120', '--scenes', '3', '--factor', '2']) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r['results']) == {'xarray_read', 'single_frame', 'three_frame'}
    assert (
        r['results']['three_frame']['frames_per_target'] == [1, 2, 3]
        and r['results']['three_frame']['scene_reads'] == 3
    )
    assert all(v['cpu_s_per_scene'] > 0 and v['peak_rss_MB'] > 0 for v in r['results'].values())
    assert r['ratios']['three_vs_single_frame_cpu'] > 0 and r['extrapolation']['scenes'] == 512
    assert set(r['goals_met']) == {
        'three_frame_le_1.5x_single',
        'throughput_ge_50pct_xarray',
        'peak_memory_le_1.5GB',
    }
    assert (
        r['extrapolation']['slurm_array']['tasks'] == 32
        and len(r['ratios']['throughput_vs_xarray_read_rounds']) == 1
    )


def test_bench_preprocess_refuses_bad_counts(capsys):
    "A count below 1 is an argparse error that names the flag, before any scene is made."
    from seaice_nb.cli import main

    with pytest.raises(SystemExit) as e:
        main(['bench', 'preprocess', '--array-tasks', '0'])
    assert e.value.code == 2 and '--array-tasks must be at least 1' in capsys.readouterr().err


def test_old_store_is_refused_but_audited(scenes_dir, store, tmp_path):
    "A store of format 1 cannot be trained on (the message says how to rebuild it) but validation still checks its values."
    import zarr
    from seaice_nb.data.datasets import SceneStore

    out, _ = store
    old = tmp_path / 'old.zarr'
    shutil.copytree(out, old)
    meta = json.loads((old / 'zarr.json').read_text())
    meta['attributes']['seaice:format'] = 'seaice_nb.preprocess/1'
    (old / 'zarr.json').write_text(json.dumps(meta))
    name = done_scenes(old)[0]
    g = zarr.open_group(old / name, mode='r+')
    sic = g['sic'][...]
    sic[3, 4] = 200
    g['sic'][...] = sic
    with pytest.raises(Exception, match='--overwrite'):
        SceneStore(old)
    problems = validate_store(old)
    assert any('format seaice_nb.preprocess/1' in p and '--overwrite' in p for p in problems), problems
    assert f"{name}: sic has 1 pixels outside 0..10 (or 255), e.g. 200" in problems


def test_store_format_is_the_one_release_0_1_wrote(store):
    "The format written into zarr.json is an on-disk name: moving the module (seaice_nb.data.preprocess) must not change it, or every existing store is refused."
    out, _ = store
    assert (
        json.loads((out / 'zarr.json').read_text())['attributes']['seaice:format'] == 'seaice_nb.preprocess/2'
    )
