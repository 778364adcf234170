"""Preprocessing at real-scale habits on tiny synthetic scenes: every kind of bad scene is named and never written,
each scene is read once however many stacks use it, workers die with their parent, one run per store."""

import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import seaice_nb.data.preprocess as pp
from seaice_nb.data.preprocess import PreprocessConfig, done_scenes, find_scenes, preprocess, validate_store
from seaice_nb.data.scenes import CHART_VARS, SAR_DIMS, write_scene
from seaice_nb.data.synth import generate_scenes

SIZE = (100, 120)
OPTS = ['-o', 'factor=2', '-o', 'chunk=32', '-o', 'max_days=30', '-o', 'min_overlap=0.05']
CFG = PreprocessConfig(factor=2, chunk=32, max_days=30, min_overlap=0.05)


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    "Four synthetic scenes of one site over a few days (tiny)."
    d = tmp_path_factory.mktemp('good')
    generate_scenes(d, 4, seed=5, size=SIZE, progress=False)
    return d


def _edit(src: Path, dst: Path, fn):
    "Write a copy of scene `src` as `dst` (its scene_id renamed) after `fn(ds)` changed it."
    with xr.open_dataset(src, engine='netcdf4', mask_and_scale=False, decode_times=False) as ds:
        ds = ds.load()
    ds = fn(ds) or ds
    ds.attrs['scene_id'] = dst.name
    write_scene(ds, dst)


def _transpose_all(ds):
    for v in [v for v in ds.data_vars if ds[v].dims == SAR_DIMS]:
        ds[v] = (SAR_DIMS[::-1], ds[v].values.T.copy(), ds[v].attrs)


def _set(var, i, value, dtype=None):
    def fn(ds):
        a = ds[var].values.astype(dtype or ds[var].dtype)
        a[i, i] = value
        ds[var] = (ds[var].dims, a, ds[var].attrs)

    return fn


# file name -> (how it is broken, a phrase its error must contain)
BAD = {
    '20300101T000000_dmi_prep.nc': ('truncated', 'download it again'),
    '20300102T000000_dmi_prep.nc': ('zero-byte', 'download it again'),
    '20300103T000000_dmi_prep.nc': ('not NetCDF', 'download it again'),
    '20300104T000000_dmi_prep.nc': (
        lambda ds: ds.update(
            {'nersc_sar_primary': (SAR_DIMS[::-1], ds['nersc_sar_primary'].values.T.copy())}
        ),
        'nersc_sar_primary: dims are',
    ),
    '20300105T000000_dmi_prep.nc': (_transpose_all, 'dims are (\'sar_samples\', \'sar_lines\')'),
    '20300106T000000_dmi_prep.nc': (_set('nersc_sar_primary', 5, np.nan), 'nersc_sar_primary: 1 NaN'),
    '20300107T000000_dmi_prep.nc': (
        _set('nersc_sar_secondary', 6, np.inf),
        'nersc_sar_secondary: 1 infinite',
    ),
    '20300108T000000_dmi_prep.nc': (_set('SIC', 7, np.nan, 'float32'), 'SIC: 1 NaN'),
    '20300109T000000_dmi_prep.nc': (_set('SOD', 8, -np.inf, 'float32'), 'SOD: 1 infinite'),
    '20300110T000000_dmi_prep.nc': (_set('SIC', 9, 200), 'SIC: 1 pixels outside 0..10'),
    '20300111T000000_dmi_prep.nc': (_set('SOD', 0, 0, 'float32'), 'SOD: dtype is float32'),
    '20300112T000000_dmi_prep.nc': (
        lambda ds: ds.drop_vars('btemp_36_5h'),
        'btemp_36_5h: variable is missing',
    ),
}


@pytest.fixture(scope='module')
def mixed(good, tmp_path_factory):
    "The good scenes, the oldest one missing a variable (an earlier frame of the others), and every kind of bad file."
    d = tmp_path_factory.mktemp('mixed')
    files = find_scenes(good)
    for f in files:
        shutil.copy(f, d / f.name)
    _edit(files[0], d / files[0].name, lambda ds: ds.drop_vars('tcwv'))  # missing earlier-frame variable
    raw = files[1].read_bytes()
    for name, (how, _) in BAD.items():
        if how == 'truncated':
            (d / name).write_bytes(raw[: len(raw) // 2])
        elif how == 'zero-byte':
            (d / name).write_bytes(b'')
        elif how == 'not NetCDF':
            (d / name).write_bytes(b'<html>202 Accepted</html>')
        else:
            _edit(files[1], d / name, how)
    return d, [f.name for f in files]


def test_bad_scenes_named_never_written(mixed, tmp_path, monkeypatch, capsys):
    src, names = mixed
    reads = []
    real = pp.read_scene
    monkeypatch.setattr(
        pp, 'read_scene', lambda p, strict=False: (reads.append(Path(p).name), real(p, strict))[1]
    )
    out = tmp_path / 'store.zarr'
    rc = pp.main([str(src), str(out), '--workers', '0', '--quiet', *OPTS])
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert rc == 1
    bad = set(BAD) | {names[0]}
    assert set(s['failed']) == bad, s['failed']
    for name, (_, phrase) in BAD.items():
        assert s['failed'][name].startswith(name) or name in s['failed'][name], (name, s['failed'][name])
        assert phrase in s['failed'][name], (name, s['failed'][name])
        assert f"FAILED {name}: " in cap.err
    assert (
        'tcwv: variable is missing' in s['failed'][names[0]]
    )  # the frame's problem, against the frame's file
    assert sorted(reads) == sorted(set(reads))  # no scene read twice
    good = sorted(n.replace('_prep.nc', '') for n in names[1:])
    assert s['written'] == len(good) and sorted(done_scenes(out)) == good  # every good scene, no bad one
    dropped = {}
    for g in good:
        with xr.open_zarr(out / g, consolidated=False) as ds:
            dropped.update(json.loads(ds.attrs['seaice:dropped_frames']))
    assert names[0] in dropped  # a good target that wanted the bad frame was written without it
    assert validate_store(out, src, check_md5=False) == []
    assert not pp._tmp_root(out).exists() and not pp._lock_dir(out).exists()  # nothing temporary left
    # rerun: no good scene is read or written again; the bad ones are reported again
    reads.clear()
    rc = pp.main([str(src), str(out), '--workers', '0', '--quiet', *OPTS])
    s2 = json.loads(capsys.readouterr().out)
    assert rc == 1 and s2['written'] == 0 and s2['skipped'] == len(good) and set(s2['failed']) == bad
    assert not set(reads) & set(names[1:]), reads


def test_each_scene_read_once(good, tmp_path, monkeypatch):
    "With 4-frame stacks the oldest scene is a frame of three stacks (and its own target): it is read once."
    reads = []
    real = pp.read_scene
    monkeypatch.setattr(
        pp, 'read_scene', lambda p, strict=False: (reads.append(Path(p).name), real(p, strict))[1]
    )
    out = tmp_path / 's.zarr'
    cfg = PreprocessConfig(factor=2, chunk=32, max_frames=4, max_days=30, min_overlap=0.05)
    s = preprocess(good, out, cfg, workers=0, progress=False)
    assert s['failed'] == {} and len(s['written']) == 4
    uses = {}
    for g in s['written']:
        with xr.open_zarr(out / g, consolidated=False) as ds:
            for src in ds['source'].values:
                uses[str(src)] = uses.get(str(src), 0) + 1
    oldest = min(uses)
    assert uses[oldest] == 4, uses  # three stacks use it as an earlier frame, plus its own
    assert sorted(reads) == sorted(p.name for p in find_scenes(good)), reads  # every scene read exactly once


def _children(pid: int) -> list[int]:
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return state != 'Z'


CMD = [
    sys.executable,
    '-c',
    'import sys; from seaice_nb.data.preprocess import main; sys.exit(main(sys.argv[1:]))',
]


def test_kill_parent_kills_workers(good, tmp_path):
    out = tmp_path / 'k.zarr'
    p = subprocess.Popen(
        CMD + [str(good), str(out), '--workers', '2', '--quiet', *OPTS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0, kids = time.time(), []
    while time.time() - t0 < 60 and p.poll() is None and len(kids) < 2:
        kids = _children(p.pid)
        time.sleep(0.02)
    assert p.poll() is None and kids, 'the run ended before its workers could be seen'
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.time()
    while time.time() - t0 < 10 and any(_alive(k) for k in kids):
        time.sleep(0.05)
    assert not [k for k in kids if _alive(k)], 'pool workers outlived their killed parent'
    # the next run clears what the killed one left (its lock is stale, its temporary folder is removed)
    s = preprocess(good, out, CFG, workers=0, progress=False)
    assert s['failed'] == {} and len(done_scenes(out)) == 4
    assert not pp._tmp_root(out).exists() and not pp._lock_dir(out).exists()


GATED = [
    sys.executable,
    '-c',
    'import os, sys, time; from seaice_nb.cli import main\n'
    'open(sys.argv[1] + "." + str(os.getpid()), "w").close()\n'
    'while not os.path.exists(sys.argv[1]): time.sleep(0.002)\n'
    'sys.exit(main(["preprocess"] + sys.argv[2:]))',
]


def test_concurrent_runs_one_store(good, tmp_path):
    "Two runs start together on a new store (one with --overwrite): one proceeds, the other gets a clear error."
    out, go = tmp_path / 'c.zarr', tmp_path / 'go'
    args = [str(good), str(out), '--workers', '0', '--quiet', *OPTS]
    ps = [
        subprocess.Popen(
            GATED + [str(go)] + args + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for extra in ([], ['--overwrite'])
    ]
    t0 = time.time()  # both have imported seaice_nb and wait at the gate
    while len(list(tmp_path.glob('go.*'))) < 2 and time.time() - t0 < 60:
        time.sleep(0.01)
    go.touch()
    res = [p.communicate(timeout=120) + (p.returncode,) for p in ps]
    ok = [r for r in res if r[2] == 0]
    refused = [r for r in res if r[2] != 0]
    assert len(ok) == 1 and len(refused) == 1, res
    assert json.loads(ok[0][0])['written'] == 4 and len(done_scenes(out)) == 4
    assert refused[0][2] == 1 and 'is being written by another run (host' in refused[0][1], refused[0][1]
    assert refused[0][1].startswith('seaice: error:') and 'Traceback' not in refused[0][1]
    assert validate_store(out, good, check_md5=False) == []
