"""seaice_nb.data.synth: validity, determinism, the command, and that the physics is shaped right."""

import json, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest

from seaice_nb.data import scenes as S
from seaice_nb.core import file_digest
from seaice_nb.data.synth import World, WorldConfig, generate_scenes

SEAICE = [str(Path(sys.executable).parent / 'seaice')]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "16 small scenes in two campaigns (an ice-edge site and a coastal site), a quarter as test scenes."
    d = tmp_path_factory.mktemp('synth')
    m = json.loads(
        generate_scenes(
            d, n_scenes=16, seed=0, size=(200, 240), test_fraction=0.25, progress=False
        ).read_text()
    )
    return d, m


def _load(d, rec):
    with S.open_scene(d / rec['file']) as ds:
        return ds.load()


def test_every_scene_validates(demo):
    d, m = demo
    assert len(m['scenes']) == 16 and sum(s['split'] == 'test' for s in m['scenes']) == 4
    for rec in m['scenes']:
        assert [str(p) for p in S.validate_scene(d / rec['file']) if p.severity == 'error'] == []
        assert S.parse_raw_name(rec['original_id']).rtt == rec['file']
        if rec['split'] == 'test':
            with S.open_scene(d / rec['file'], reference=False) as ds:
                assert not any(c in ds for c in S.CHART_VARS)
            assert (d / rec['reference']).exists()


def test_same_seed_same_bytes(tmp_path):
    a = generate_scenes(
        tmp_path / 'a', n_scenes=3, seed=5, size=(80, 100), test_fraction=0.34, progress=False
    )
    generate_scenes(
        tmp_path / 'b', n_scenes=3, seed=5, size=(80, 100), test_fraction=0.34, progress=False, workers=2
    )
    generate_scenes(tmp_path / 'c', n_scenes=3, seed=6, size=(80, 100), progress=False)
    names = sorted(p.name for p in (tmp_path / 'a').iterdir())
    assert (
        names == sorted(p.name for p in (tmp_path / 'b').iterdir()) and len(names) == 5
    )  # 3 scenes, 1 reference, manifest
    for n in names:
        assert file_digest(tmp_path / 'a' / n) == file_digest(tmp_path / 'b' / n), n
    assert {file_digest(p) for p in (tmp_path / 'c').glob('*.nc')}.isdisjoint(
        {file_digest(p) for p in (tmp_path / 'a').glob('*.nc')}
    )
    # a rerun keeps finished scenes (resume) and gives the same manifest
    before = a.read_text()
    generate_scenes(tmp_path / 'a', n_scenes=3, seed=5, size=(80, 100), test_fraction=0.34, progress=False)
    assert a.read_text() == before


def test_command_writes_valid_scenes(tmp_path):
    r = subprocess.run(
        SEAICE
        + [
            'synth',
            '--out',
            str(tmp_path),
            '--scenes',
            '2',
            '--seed',
            '1',
            '--size',
            '60',
            '70',
            '--test-fraction',
            '0.5',
            '--workers',
            '1',
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(tmp_path.glob('*_prep.nc'))) == 2 and len(list(tmp_path.glob('*_prep_reference.nc'))) == 1
    v = subprocess.run(SEAICE + ['validate', str(tmp_path)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout
    bad = subprocess.run(
        SEAICE + ['synth', '--out', str(tmp_path), '--scenes', '2', '--size', '10', '10'],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and 'too small' in bad.stderr and 'Traceback' not in bad.stderr


def _pool(demo, fn):
    d, m = demo
    return [fn(_load(d, rec)) for rec in m['scenes'] if rec['split'] == 'train']


def test_hv_water_darker_than_old_ice(demo):
    def means(ds):
        hv = S.destandardise(ds['nersc_sar_secondary'].values, 'nersc_sar_secondary')
        ok = ds['nersc_sar_secondary'].values != 0
        ok_ice = ok & (ds['SIC'].values >= 9)
        return (
            hv[ok & (ds['SOD'].values == 0)],
            hv[ok_ice & (ds['SOD'].values == 5)],
            hv[ok_ice & (ds['SOD'].values == 4)],
        )

    w, o, fy = (np.concatenate(x) for x in zip(*_pool(demo, means)))
    assert w.size > 1000 and o.size > 1000 and fy.size > 1000, (w.size, o.size, fy.size)
    assert w.mean() < fy.mean() - 2, (w.mean(), fy.mean())
    assert w.mean() < o.mean() - 5, (w.mean(), o.mean())  # open water near the noise floor


def test_amsr2_36h_rises_with_sic(demo):
    def cells(ds):
        sic = ds['SIC'].values.astype(float)
        sic[sic == 255] = np.nan
        h, w = ds.sizes['2km_grid_lines'], ds.sizes['2km_grid_samples']
        blocks = sic[: h * 25, : w * 25].reshape(h, 25, w, 25)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            mean = np.nanmean(blocks, axis=(1, 3))
        tb = S.destandardise(ds['btemp_36_5h'].values, 'btemp_36_5h')
        ok = np.isfinite(mean)
        return mean[ok], tb[ok]

    s, tb = (np.concatenate(x) for x in zip(*_pool(demo, cells)))
    assert np.ptp(s) >= 8
    assert np.corrcoef(s, tb)[0, 1] > 0.8
    assert tb[s <= 1].mean() + 50 < tb[s >= 9].mean()  # water ~ 120-150 K, consolidated ice ~ 230 K


def test_incidence_angle_grows_across_the_swath(demo):
    for ds in _pool(demo, lambda ds: ds):
        inc = S.destandardise(ds['sar_incidenceangle'].values, 'sar_incidenceangle')
        ok = ds['sar_incidenceangle'].values != 0
        for line in range(0, inc.shape[0], 7):
            assert np.all(np.diff(inc[line][ok[line]]) > 0)  # grows with the sample index (right-looking SAR)
        assert 18.5 <= inc[ok].min() and inc[ok].max() <= 47.5


def test_swath_edge_has_no_data(demo):
    nodata = _pool(demo, lambda ds: float((ds['nersc_sar_primary'].values == 0).mean()))
    assert max(nodata) > 0.01  # some scenes reach past the swath edge
    assert min(nodata) < 0.5


def _pixel_index(ds):
    "Affine map EPSG:3413 (x, y) -> (line, sample) fitted on the tie points."
    lat, lon = S.tie_points(ds)
    x, y = S.to_polar_stereo(lat, lon)
    H, W = ds.sizes['sar_lines'], ds.sizes['sar_samples']
    L, C = np.meshgrid(
        np.linspace(0, H - 1, lat.shape[0]), np.linspace(0, W - 1, lat.shape[1]), indexing='ij'
    )
    A = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], 1)
    cl = np.linalg.lstsq(A, L.ravel(), rcond=None)[0]
    cs = np.linalg.lstsq(A, C.ravel(), rcond=None)[0]
    return lambda px, py: (px * cl[0] + py * cl[1] + cl[2], px * cs[0] + py * cs[1] + cs[2])


def test_overlapping_scenes_agree_on_charts_the_same_day(demo):
    d, m = demo
    recs = [r for r in m['scenes']]
    n_pairs = 0
    for i, a in enumerate(recs):
        for b in recs[i + 1 :]:
            if a['date'][:10] != b['date'][:10] or a['site'] != b['site']:
                continue
            A, B = _load(d, a), _load(d, b)
            la, lo = S.scene_latlon(B)
            x, y = S.to_polar_stereo(la, lo)
            li, si = _pixel_index(A)(x, y)
            li, si = np.rint(li).astype(int), np.rint(si).astype(int)
            inside = (li >= 0) & (li < A.sizes['sar_lines']) & (si >= 0) & (si < A.sizes['sar_samples'])
            if inside.mean() < 0.2:
                continue
            for c in S.CHART_VARS:
                ca = A[c].values[li[inside], si[inside]]
                cb = B[c].values[inside]
                both = (ca != 255) & (cb != 255)
                if both.sum() < 1000:
                    continue  # e.g. FLOE over fast ice is 255 everywhere
                assert (ca[both] == cb[both]).mean() > 0.97, (a['file'], b['file'], c)
                n_pairs += 1
    assert n_pairs >= 3


def test_world_evolves_by_drift():
    w = World(WorldConfig(seed=2))
    x, y = np.meshgrid(np.linspace(600, 1200, 500), np.linspace(-2300, -1300, 500))
    t = 40.2  # the same lead period at t and t + 1
    D = w.cfg.drift_kmd
    a, same, moved = w.state(x, y, t), w.state(x, y, t + 1), w.state(x - 0.12 * D, y - D, t + 1)
    miz = (a['c0'] > 0.2) & (a['c0'] < 0.8) & (moved['c0'] > 0.2) & (moved['c0'] < 0.8) & ~a['land']
    assert miz.sum() > 500
    follow = (a['ice'] == moved['ice'])[miz].mean()
    stay = (a['ice'] == same['ice'])[miz].mean()
    assert follow > 0.7 and follow > stay + 0.15, (follow, stay)  # the floes moved with the current


def test_class_balance_and_knob():
    x, y = np.meshgrid(np.linspace(500, 1300, 200), np.linspace(-2400, -1000, 200))
    sea = lambda st: ~st['land']

    def fractions(cfg, t):
        st = World(cfg).state(x, y, t)
        s = st['stage'][sea(st)]
        return np.bincount(np.clip(s, 0, 5), minlength=6) / s.size

    f = fractions(WorldConfig(seed=0), 80.0)  # late March
    assert f[0] == f.max()  # open water dominates
    assert 0 < f[1] + f[2] < 0.15  # new and young ice rare but present
    g = fractions(WorldConfig(seed=0, rare_boost=3.0), 80.0)
    assert g[1] + g[2] > 1.5 * (f[1] + f[2])
    summer = fractions(WorldConfig(seed=0), 230.0)  # August: no new or young ice, less ice
    assert summer[1] + summer[2] == 0 and summer[0] > f[0]
