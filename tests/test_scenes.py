"""seaice_nb.data.scenes: names, the validator on defective files, the `seaice validate` command, geolocation."""

import json, subprocess, sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SCENE_LISTS

from seaice_nb.data import scenes as S
from seaice_nb.data.synth import generate_scenes

SEAICE = [str(Path(sys.executable).parent / 'seaice')]


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    "One valid synthetic scene (and one test scene with its reference file)."
    d = tmp_path_factory.mktemp('good')
    m = json.loads(
        generate_scenes(d, n_scenes=2, seed=3, size=(120, 150), test_fraction=0.5, progress=False).read_text()
    )
    train = next(s for s in m['scenes'] if s['split'] == 'train')
    test = next(s for s in m['scenes'] if s['split'] == 'test')
    return d / train['file'], d / test['file']


def _variant(src: Path, dst: Path, edit):
    "Write a copy of `src` with `edit(ds)` applied."
    with S.open_scene(src) as ds:
        ds = ds.load()
    ds = edit(ds) or ds
    ds.attrs['scene_id'] = dst.name
    return S.write_scene(ds, dst)


def _errors(path):
    return [p for p in S.validate_scene(path) if p.severity == 'error']


def test_official_lists_parse():
    names = json.loads((SCENE_LISTS / 'dataset.json').read_text())
    parsed = [S.parse_raw_name(n) for n in names]
    assert len(parsed) == 512
    assert Counter(p.ice_service for p in parsed) == {'dmi': 315, 'cis': 197}
    assert Counter(p.start.year for p in parsed) == {2018: 88, 2019: 128, 2020: 117, 2021: 179}
    assert len({p.rtt for p in parsed}) == 512
    assert all(p.rtt == n[17:32] + '_' + n[77:80] + '_prep.nc' for p, n in zip(parsed, names))
    assert {p.region for p in parsed if p.ice_service == 'dmi'} >= {
        'SouthEast_RIC',
        'CapeFarewell_RIC',
        'CentralEast_RIC',
    }
    test = [S.parse_raw_name(n) for n in json.loads((SCENE_LISTS / 'testset.json').read_text())]
    assert len(test) == 20


def test_valid_scene_and_test_scene(good):
    train, test = good
    assert _errors(train) == []
    assert _errors(test) == []  # charts come from _prep_reference.nc
    with S.open_scene(test, reference=False) as ds:
        assert 'SIC' not in ds
    with S.open_scene(test) as ds:
        assert ds['SOD'].dtype == np.uint8 and ds.sizes['sar_lines'] == 120


@pytest.mark.parametrize(
    'name,edit,variable,words',
    [
        ('missing', lambda ds: ds.drop_vars('btemp_36_5h'), 'btemp_36_5h', 'variable is missing'),
        (
            'dtype',
            lambda ds: ds.assign(SIC=ds['SIC'].astype('int16')),
            'SIC',
            'dtype is int16, expected uint8',
        ),
        (
            'nan_chart',
            lambda ds: ds.assign(
                SOD=ds['SOD']
                .astype('float32')
                .where(ds['SOD'] < 200, np.nan)
                .where(lambda a: a.sar_lines != 5, np.nan)
            ),
            'SOD',
            'NaN values in a chart',
        ),
        (
            'range',
            lambda ds: ds.assign(FLOE=ds['FLOE'].where(ds['FLOE'].sar_lines != 3, 9).astype('uint8')),
            'FLOE',
            'outside 0..6',
        ),
        (
            'sar_nan',
            lambda ds: ds.assign(nersc_sar_secondary=ds['nersc_sar_secondary'].where(ds.sar_samples != 7)),
            'nersc_sar_secondary',
            'NaN values',
        ),
        ('dims', lambda ds: ds.assign(t2m=ds['t2m'].transpose()), 't2m', 'dims are'),
    ],
)
def test_defects_are_named(good, tmp_path, name, edit, variable, words):
    bad = _variant(good[0], tmp_path / f'20200101T00000{len(name) % 10}_dmi_prep.nc', edit)
    errs = _errors(bad)
    assert any(p.variable == variable and words in p.message for p in errs), [str(p) for p in errs]


def test_inconsistent_charts(good, tmp_path):
    def edit(ds):
        sod = ds['SOD'].values.copy()
        sic = ds['SIC'].values.copy()
        sic[:10, :10] = 0
        sod[:10, :10] = 2  # young ice where the chart says open water
        sic[10:20, :10] = 5
        sod[10:20, :10] = 0  # open water where there is ice
        return ds.assign(
            SOD=(ds['SOD'].dims, sod, ds['SOD'].attrs), SIC=(ds['SIC'].dims, sic, ds['SIC'].attrs)
        )

    errs = _errors(_variant(good[0], tmp_path / '20200102T000000_dmi_prep.nc', edit))
    msgs = [str(p) for p in errs]
    assert any('SOD' in m and 'SIC is 0 (open water) but SOD is not 0' in m for m in msgs), msgs
    assert any('SOD' in m and 'SIC > 0 (ice) but SOD is 0' in m for m in msgs), msgs


def test_truncated_and_garbage_files(good, tmp_path):
    raw = good[0].read_bytes()
    for i, cut in enumerate((len(raw) // 2, 200, 0)):
        p = tmp_path / f'2020010{i + 3}T000000_dmi_prep.nc'
        p.write_bytes(raw[:cut])
        errs = _errors(p)
        assert (
            errs
            and errs[0].variable is None
            and ('truncated or corrupt' in errs[0].message or 'cannot' in errs[0].message)
        )
    # a file whose header survives but whose data chunks are damaged: reported per variable, no crash
    p = tmp_path / '20200109T000000_dmi_prep.nc'
    b = bytearray(raw)
    mid = len(b) // 2
    b[mid : mid + 4096] = bytes(4096)
    p.write_bytes(bytes(b))
    assert isinstance(S.validate_scene(p), list)


def test_validate_command(good, tmp_path):
    bad = tmp_path / '20200110T000000_dmi_prep.nc'
    bad.write_bytes(good[0].read_bytes()[:1000])
    ok = subprocess.run(SEAICE + ['validate', str(good[0]), str(good[1])], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert '2 of 2 scenes valid' in ok.stdout
    r = subprocess.run(
        SEAICE + ['validate', str(good[0]), str(bad), str(tmp_path / 'missing_prep.nc')],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert 'Traceback' not in r.stdout + r.stderr
    assert (
        'truncated or corrupt' in r.stdout
        and 'does not exist' in r.stdout
        and '1 of 3 scenes valid' in r.stdout
    )


def test_latlon_resolution_and_order(good, tmp_path):
    with S.open_scene(good[0]) as ds:
        H, W = ds.sizes['sar_lines'], ds.sizes['sar_samples']
        lat_t = ds['sar_grid2d_latitude'].values.T  # stored (sample, line) -> (line, sample)
        lat, lon = S.scene_latlon(ds)
        assert lat.shape == (H, W)
        # full resolution: the corner pixels sit on the corner tie points (within half a pixel, < 100 m)
        assert abs(lat[0, 0] - lat_t[0, 0]) < 1e-3 and abs(lat[-1, -1] - lat_t[-1, -1]) < 1e-3
        low, _ = S.scene_latlon(ds, shape=(H // 10, W // 10))
        assert low.shape == (12, 15)
        np.testing.assert_allclose(low, lat[5::10, 5::10], atol=2e-3)
        # the same content written transposed under the spec's dim names is detected (scene is not square)
        ds2 = ds.load().copy()
        for v in S.GEO_VARS:
            ds2[v] = (S.TIE_DIMS, ds[v].values.T.copy(), ds[v].attrs)
        lat2, lon2 = S.scene_latlon(ds2)
        np.testing.assert_allclose(lat2, lat, atol=1e-9)
        np.testing.assert_allclose(lon2, lon, atol=1e-9)
        with pytest.raises(AssertionError):  # forcing the wrong order does change the answer
            np.testing.assert_allclose(S.scene_latlon(ds2, order='sample_line')[0], lat, atol=1e-6)
    x, y = S.to_polar_stereo(lat, lon)
    # 80 m pixels: neighbouring pixels are 80 m apart in EPSG:3413 (scale error < 3 % in the Arctic)
    step = np.hypot(np.diff(x, axis=1), np.diff(y, axis=1))
    assert 75 < step.mean() < 85


def test_plots_close_their_figures(good):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    with S.open_scene(good[0]) as ds:
        fig = S.plot_scene(ds)
        plt.close(fig)
        ax = S.plot_footprints([ds])
        plt.close(ax.figure)
    assert plt.get_fignums() == []
    assert S.use_offline_natural_earth() is not None
