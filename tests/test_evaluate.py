"""Evaluation: tiled inference (blending, bounded reads), 80 m scoring end to end, the upload package, bad input."""

import json
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, r2_score
from torch import nn

from seaice_nb.core import CheckpointError, ConfigError, DataError
from seaice_nb.evaluation.evaluate import (
    check_store,
    check_submission,
    predict_scene,
    upsample_nearest,
    write_submission,
)
from seaice_nb.charts import CHARTS, N_CLASSES


class PixelNet(nn.Module):
    """A per-pixel (1x1 conv) model: its output at a pixel does not depend on the tiling."""

    input_keys = ('image',)

    def __init__(self, c=5):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({k: nn.Conv2d(c, N_CLASSES[k], 1) for k in CHARTS})
        self.max_input = (0,)

    def forward(self, image):
        self.max_input = max(self.max_input, tuple(image.shape))
        return {k: h(image[:, -1]) for k, h in self.heads.items()}


class CountingArray:
    """numpy array stand-in recording the largest window read (what a lazy zarr array would load)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.max_read = a, a.shape, a.dtype, 0

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        out = self.a[idx]
        self.max_read = max(self.max_read, out.size)
        return out


def scene_arrays(H, W, C=5, T=1, cf=2, seed=0):
    rng = np.random.default_rng(seed)
    arr = {
        'image': rng.normal(size=(T, C, H, W)).astype(np.float32),
        'valid': np.ones((T, H, W), bool),
        'doy': np.array([10] * T),
        'days_before': np.arange(T)[::-1].copy(),
        **{c: rng.integers(0, N_CLASSES[c], (H, W)).astype(np.uint8) for c in CHARTS},
        'amsr2': np.zeros((2, H // cf, W // cf), np.float32),
        'era5': np.zeros((1, H // cf, W // cf), np.float32),
    }
    meta = {
        'scene': '20210101T000000_dmi',
        'ice_service': 'dmi',
        'region': '',
        'date': '2021-01-01',
        'shape': (H, W),
    }
    return arr, meta


def test_tiled_blended_prediction_equals_whole_scene_and_reads_tiles_only():
    arr, meta = scene_arrays(70, 90)
    whole = predict_scene(PixelNet(), arr, meta, 2, tile=96, overlap=0)
    arr['image'] = CountingArray(arr['image'])
    m = PixelNet()
    tiled = predict_scene(m, arr, meta, 2, tile=16, overlap=6, batch_size=3)
    for c in CHARTS:
        np.testing.assert_array_equal(tiled[c], whole[c])
    assert arr['image'].max_read <= 5 * 16 * 16  # never more than one tile of one frame
    assert m.max_input[0] <= 3 and m.max_input[-2:] == (16, 16)  # one batch of tiles on the device


def test_memory_stays_bounded_on_a_large_scene():
    # a 900 x 1000 x 24-channel scene (86 MB as float32) read lazily: each read and each forward is one tile
    H, W, C = 900, 1000, 24

    class Lazy(CountingArray):
        def __init__(self):
            self.shape, self.dtype, self.max_read = (1, C, H, W), np.float32, 0

        def __getitem__(self, idx):
            shape = [len(range(*s.indices(n))) for s, n in zip(idx, self.shape)]
            self.max_read = max(self.max_read, int(np.prod(shape)))
            return np.ones(shape, np.float32)

    arr, meta = scene_arrays(8, 8, C=C)
    arr.update(
        image=Lazy(),
        valid=np.ones((1, H, W), bool),
        amsr2=np.zeros((2, H // 4, W // 4), np.float32),
        era5=np.zeros((1, H // 4, W // 4), np.float32),
        **{c: np.zeros((H, W), np.uint8) for c in CHARTS},
    )
    meta['shape'] = (H, W)
    m = PixelNet(C)
    out = predict_scene(m, arr, meta, 4, tile=256, overlap=32, batch_size=4)
    assert out['sod'].shape == (H, W) and out['sod'].dtype == np.uint8
    assert arr['image'].max_read == C * 256 * 256
    assert m.max_input == (4, 1, C, 256, 256)


def test_upload_package_format(tmp_path):
    rng = np.random.default_rng(0)
    preds = {
        '20190301T101010_cis_prep.nc': {
            c: rng.integers(0, N_CLASSES[c], (30, 40)).astype(np.uint8) for c in CHARTS
        },
        '20200606T060606_dmi': {c.upper(): rng.integers(0, N_CLASSES[c], (20, 25)) for c in CHARTS},
    }
    path = write_submission(preds, tmp_path / 'upload_package.nc')
    with netCDF4.Dataset(path) as nc:
        assert nc.data_model == 'NETCDF4'
        assert sorted(nc.variables) == sorted(
            f"{s}_{c}" for s in ('20190301T101010_cis', '20200606T060606_dmi') for c in ('SIC', 'SOD', 'FLOE')
        )
        v = nc.variables['20200606T060606_dmi_FLOE']
        assert v.dtype == np.uint8 and v.dimensions == (
            '20200606T060606_dmi_FLOE_dim0',
            '20200606T060606_dmi_FLOE_dim1',
        )
        assert v.filters()['zlib'] and v.filters()['complevel'] == 1 and v.shape == (20, 25)
        np.testing.assert_array_equal(v[:], preds['20200606T060606_dmi']['FLOE'])
    assert check_submission(path, list(preds)) == {
        '20190301T101010_cis': (30, 40),
        '20200606T060606_dmi': (20, 25),
    }
    with pytest.raises(DataError, match=r"scenes missing \['20211111T111111_dmi'\]"):
        check_submission(path, list(preds) + ['20211111T111111_dmi_prep.nc'])
    with pytest.raises(DataError, match='lacks chart'):
        write_submission({'20190301T101010_cis': {'sic': np.zeros((2, 2))}}, tmp_path / 'x.nc')
    with pytest.raises(
        DataError, match=r'20190301T101010_cis SIC: value 300 at 4 pixel\(s\) is not a SIC class'
    ):
        write_submission(
            {'20190301T101010_cis': {c: np.full((2, 2), 300) for c in CHARTS}}, tmp_path / 'x.nc'
        )


@pytest.mark.parametrize('chart, value', [('SIC', 11), ('SOD', 9), ('FLOE', 12), ('SOD', 6), ('FLOE', 7)])
def test_out_of_range_classes_refused_when_writing_and_checking(tmp_path, chart, value):
    "write_submission and check_submission refuse a class outside the chart's range, naming scene, chart and value."
    import xarray as xr

    maps = {c: np.zeros((6, 8), np.uint8) for c in ('SIC', 'SOD', 'FLOE')}
    maps[chart][2, 3] = value
    maps[chart][0, 0] = 255  # 255 (no data) is allowed, the class is not
    with pytest.raises(
        DataError, match=rf"20200101T010101_cis {chart}: value {value} at 1 pixel\(s\) is not a {chart} class"
    ):
        write_submission({'20200101T010101_cis_prep.nc': maps}, tmp_path / 'upload_package.nc')
    assert not list(tmp_path.iterdir())  # nothing written
    # a package made by other tools: the same check when reading it back
    ds = xr.Dataset(
        {
            f"20200101T010101_cis_{c}": (
                (f"20200101T010101_cis_{c}_dim0", f"20200101T010101_cis_{c}_dim1"),
                a,
            )
            for c, a in maps.items()
        }
    )
    path = tmp_path / 'foreign.nc'
    ds.to_netcdf(
        path,
        format='NETCDF4',
        engine='netcdf4',
        encoding={v: {'zlib': True, 'complevel': 1} for v in ds.data_vars},
    )
    with pytest.raises(
        DataError, match=rf"foreign.nc: 20200101T010101_cis {chart}: value {value} at 1 pixel"
    ):
        check_submission(path)


def test_wrong_shapes_refused(tmp_path):
    maps = {'sic': np.zeros((6, 8)), 'sod': np.zeros((6, 8)), 'floe': np.zeros((6, 7))}
    with pytest.raises(DataError, match=r'20200101T010101_cis FLOE: shape \(6, 7\), expected \(6, 8\)'):
        write_submission({'20200101T010101_cis': maps}, tmp_path / 'p.nc')
    maps['floe'] = np.zeros((6, 8))
    with pytest.raises(DataError, match=r'20200101T010101_cis SIC: shape \(6, 8\), expected \(7, 8\)'):
        write_submission(
            {'20200101T010101_cis': maps}, tmp_path / 'p.nc', shapes={'20200101T010101_cis': (7, 8)}
        )
    with pytest.raises(DataError, match=r'expected a 2-D map'):
        write_submission({'20200101T010101_cis': {**maps, 'sod': np.zeros((1, 6, 8))}}, tmp_path / 'p.nc')
    assert not list(tmp_path.iterdir())


class Oracle(nn.Module):
    "A perfect model on the store grid: it reads the store's charts and answers them (255 pixels: class 0)."

    input_keys = ('sic', 'sod', 'floe')

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, sic, sod, floe):
        out = {}
        for c, t in (('sic', sic), ('sod', sod), ('floe', floe)):
            t = torch.where(t == 255, torch.zeros_like(t), t)
            out[c] = nn.functional.one_hot(t, N_CLASSES[c]).permute(0, 3, 1, 2).float() * 10
        return out


def test_perfect_model_at_factor_10_scores_99_through_the_package(tmp_path):
    "Issue 14: the 80 m score is the written package's score, and a perfect model is not ruined by masking."
    from seaice_nb.data.datasets import SceneStore
    from seaice_nb.evaluation.evaluate import evaluate, score_submission, submission_maps
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess
    from seaice_nb.data.synth import generate_scenes
    from seaice_nb.training.runs import save_checkpoint

    generate_scenes(tmp_path / 'scenes', 3, seed=4, size=(300, 360), progress=False)
    preprocess(
        tmp_path / 'scenes',
        tmp_path / 'store.zarr',
        PreprocessConfig(factor=10, max_frames=1, chunk=64),
        workers=0,
        progress=False,
    )
    ckpt = save_checkpoint(tmp_path / 'oracle.pt', Oracle(), {'n_frames': 1})
    out = tmp_path / 'eval'
    s = evaluate(
        ckpt,
        tmp_path / 'store.zarr',
        out_dir=out,
        scene_dir=tmp_path / 'scenes',
        tile=32,
        overlap=0,
        submission=True,
        figures=False,
        progress=False,
        model=Oracle(),
    )
    assert s['official_80m']['combined'] >= 99, s['official_80m']
    assert s['scored_from'] == str(out / 'upload_package.nc') and s['n_masked_80m'] == {
        'sic': 0,
        'sod': 0,
        'floe': 0,
    }
    again = score_submission(
        out / 'upload_package.nc', tmp_path / 'scenes'
    )  # one code path: the package's number
    assert again.scores() == s['official_80m'] and again.n_pixels() == s['n_pixels_80m']
    # the package holds 255 only where the scene itself has no SAR data
    import netCDF4
    from seaice_nb.data.scenes import open_scene

    with netCDF4.Dataset(out / 'upload_package.nc') as nc:
        for name in s['scenes']:
            with open_scene(tmp_path / 'scenes' / f"{name}_prep.nc") as ds:
                hh = ds['nersc_sar_primary'].values
            for c in ('SIC', 'SOD', 'FLOE'):
                np.testing.assert_array_equal(np.asarray(nc.variables[f"{name}_{c}"][:]) == 255, hh == 0)
    # what the old code did (255 wherever the 10x store pixel was invalid) costs points on scored pixels
    st = SceneStore(tmp_path / 'store.zarr', in_memory=False)
    subs = {}
    for name in st.names:
        arrays = st.arrays(name)
        shape80 = open_scene(tmp_path / 'scenes' / f"{name}_prep.nc")['SIC'].shape
        pred = {c: np.where(np.asarray(arrays[c][...]) == 255, 0, arrays[c][...]) for c in CHARTS}
        subs[name] = submission_maps(
            pred, 10, shape80, upsample_nearest(~np.asarray(arrays['valid'][-1]), 10, shape80)
        )
    write_submission(subs, tmp_path / 'old.nc')
    old = score_submission(tmp_path / 'old.nc', tmp_path / 'scenes')
    assert sum(old.n_masked().values()) > 0 and old.scores()['combined'] < s['official_80m']['combined']


def test_evaluate_without_submission_still_scores_a_package(tmp_path, monkeypatch):
    "submission=False: the 80 m score still comes from a (temporary) package, removed afterwards."
    from seaice_nb.evaluation import evaluate as ev

    seen = []
    real = ev.score_submission
    monkeypatch.setattr(
        ev, 'score_submission', lambda p, *a, **k: (seen.append(Path(p)), real(p, *a, **k))[1]
    )
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess
    from seaice_nb.data.synth import generate_scenes
    from seaice_nb.training.runs import save_checkpoint

    generate_scenes(tmp_path / 'scenes', 1, seed=6, size=(100, 120), progress=False)
    preprocess(
        tmp_path / 'scenes',
        tmp_path / 'store.zarr',
        PreprocessConfig(factor=4, max_frames=1, chunk=64),
        workers=0,
        progress=False,
    )
    ckpt = save_checkpoint(tmp_path / 'oracle.pt', Oracle(), {'n_frames': 1})
    s = ev.evaluate(
        ckpt,
        tmp_path / 'store.zarr',
        scene_dir=tmp_path / 'scenes',
        tile=32,
        overlap=0,
        figures=False,
        progress=False,
        model=Oracle(),
    )
    assert len(seen) == 1 and seen[0].name == 'upload_package.nc' and not seen[0].exists()
    assert s['scored_from'] == 'a temporary upload package' and s['official_80m']['combined'] > 90
    with pytest.raises(ConfigError, match='submission=True needs out_dir'):
        ev.evaluate(ckpt, tmp_path / 'store.zarr', submission=True, model=Oracle(), progress=False)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """The shared tiny world of `seaice_nb.testing.fixtures`: 3 synthetic scenes -> store (4x) -> a U-Net trained for one
    epoch; the scenes and store are linked read-only, the run is a private copy (evaluation writes into it)."""
    from types import SimpleNamespace

    from seaice_nb.testing import fixtures as testing

    tmp = tmp_path_factory.mktemp('e2e')
    (tmp / 'scenes').symlink_to(testing.tiny_scenes(), target_is_directory=True)
    (tmp / 'store.zarr').symlink_to(testing.tiny_store(), target_is_directory=True)
    run = testing.tiny_run(dest=tmp / 'run')
    return tmp, SimpleNamespace(last_checkpoint=run / 'checkpoints' / 'last.pt')


def test_cli_evaluate_scores_at_80m_and_writes_package(trained):
    from seaice_nb import cli
    from seaice_nb.data.datasets import SceneStore
    from seaice_nb.data.scenes import open_scene
    from seaice_nb.training.runs import load_checkpoint

    tmp, res = trained
    out = tmp / 'eval'
    assert (
        cli.main(
            [
                'evaluate',
                str(res.last_checkpoint),
                str(tmp / 'store.zarr'),
                '--scene-dir',
                str(tmp / 'scenes'),
                '--out',
                str(out),
                '--tile',
                '32',
                '--overlap',
                '8',
                '--submission',
            ]
        )
        == 0
    )
    scores = json.loads((out / 'scores.json').read_text())
    names = scores['scenes']
    # recompute the official score independently: predict, upsample (nearest) to 80 m, pool, sklearn
    st = SceneStore(tmp / 'store.zarr', in_memory=False)
    model, meta = load_checkpoint(res.last_checkpoint)
    pooled = {c: ([], []) for c in CHARTS}
    for n in names:
        pred = predict_scene(model, st.arrays(n), st.meta[n], st.coarse_factor, tile=32, overlap=8)
        ds = open_scene(tmp / 'scenes' / f"{n}_prep.nc")
        for c in CHARTS:
            ref = ds[c.upper()].values
            up = upsample_nearest(pred[c], 4, ref.shape)
            k = ref != 255
            pooled[c][0].append(ref[k])
            pooled[c][1].append(up[k])
        ds.close()
    t = {c: np.concatenate(pooled[c][0]) for c in CHARTS}
    p = {c: np.concatenate(pooled[c][1]) for c in CHARTS}
    want = {
        'sic': round(r2_score(t['sic'], p['sic']) * 100, 3),
        'sod': round(f1_score(t['sod'], p['sod'], average='weighted') * 100, 3),
        'floe': round(f1_score(t['floe'], p['floe'], average='weighted') * 100, 3),
    }
    want['combined'] = round((2 * want['sic'] + 2 * want['sod'] + want['floe']) / 5, 3)
    assert scores['official_80m'] == want
    assert scores['n_pixels_80m']['sod'] == len(t['sod'])
    shapes = check_submission(out / 'upload_package.nc', names)
    assert all(len(s) == 2 for s in shapes.values())
    conds = {l.split(',')[0] for l in (out / 'per_condition.csv').read_text().splitlines()[1:]}
    assert {'all', 'month', 'season', 'ice_service', 'distance_to_land', 'incidence_angle'} <= conds
    figs = sorted(p.name for p in (out / 'figures').iterdir())
    assert 'confusion_sod_normalised.png' in figs and 'per_condition.png' in figs


def test_bad_input_names_the_mismatch(trained):
    from seaice_nb.evaluation.evaluate import evaluate
    from seaice_nb.models import create_model
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess

    tmp, res = trained
    other = tmp / 'store2x.zarr'
    preprocess(
        tmp / 'scenes', other, PreprocessConfig(factor=2, max_frames=1, chunk=64), workers=0, progress=False
    )
    with pytest.raises(DataError, match=r'preprocessed differently .*factor=2 \(model trained on 4\)'):
        evaluate(res.last_checkpoint, other, progress=False, figures=False)
    hh_only = tmp / 'store_hh.zarr'
    preprocess(
        tmp / 'scenes',
        hh_only,
        PreprocessConfig(factor=4, max_frames=1, chunk=64, channels=['hh', 'hv']),
        workers=0,
        progress=False,
    )
    with pytest.raises(DataError, match=r"lacks channel\(s\) \['incidence_angle', 'distance_map'"):
        evaluate(res.last_checkpoint, hh_only, progress=False, figures=False)
    with pytest.raises(CheckpointError, match='does not match the model'):
        evaluate(
            res.last_checkpoint,
            tmp / 'store.zarr',
            model=create_model('unet_baseline', in_chans=4, filters=[8, 8]),
            progress=False,
            figures=False,
        )
