"""Operational inference: `seaice predict` on a test-set scene without labels, ONNX export of every family, int8, bad input."""

import json
import logging
import shutil
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch

from seaice_nb.core import ConfigError, DataError
from seaice_nb.evaluation.metrics import CHARTS, N_CLASSES


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Six synthetic scenes of one world (3 train, 3 test with charts only in _reference.nc), two stores, a tiny U-Net."""
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess
    from seaice_nb.data.synth import generate_scenes
    from seaice_nb.data.datasets import DataConfig
    from seaice_nb.training.runs import TrainConfig
    from seaice_nb.training.trainer import train

    tmp = tmp_path_factory.mktemp('predict')
    m = json.loads(
        generate_scenes(
            tmp / 'scenes', 6, seed=2, size=(160, 200), test_fraction=0.5, progress=False
        ).read_text()
    )
    split = {
        s: [tmp / 'scenes' / r['file'] for r in m['scenes'] if r['split'] == s] for s in ('train', 'test')
    }
    pre = PreprocessConfig(factor=4, max_frames=1, chunk=64)
    preprocess(split['train'], tmp / 'train.zarr', pre, workers=0, progress=False)
    preprocess(split['test'], tmp / 'test.zarr', pre, workers=0, progress=False)
    torch.manual_seed(0)
    cfg = TrainConfig(
        name='p',
        model='unet_baseline',
        model_kwargs={'filters': [8, 8]},
        epochs=20,
        batch_size=4,
        lr=0.01,
        data=DataConfig(store=str(tmp / 'train.zarr'), crop=32),
        progress=False,
    )
    res = train(cfg, run_dir=tmp / 'run')
    return tmp, res, split


def _alone(world, i=0):
    """Test scene i copied into a folder of its own: no _reference.nc, no store."""
    tmp, _, split = world
    src = split['test'][i]
    d = tmp / f'alone{i}'
    d.mkdir(exist_ok=True)
    shutil.copy(src, d / src.name)
    assert not (d / src.name.replace('.nc', '_reference.nc')).exists()
    return d / src.name


def _predict_cli(run, scene, out, *extra) -> int:
    """`seaice predict RUN SCENE --out OUT` on 32-pixel tiles, quietly."""
    from seaice_nb import cli

    return cli.main(
        [
            'predict',
            str(run),
            str(scene),
            '--out',
            str(out),
            '--tile',
            '32',
            '--overlap',
            '8',
            '--quiet',
            *extra,
        ]
    )


def test_predict_cli_on_unlabelled_test_scene_matches_evaluation(world):
    import rasterio
    from matplotlib.image import imread
    from seaice_nb.data.datasets import SceneStore
    from seaice_nb.evaluation.evaluate import predict_scene, upsample_nearest
    from seaice_nb.training.runs import load_checkpoint

    tmp, res, _ = world
    scene = _alone(world)
    with netCDF4.Dataset(scene) as nc:
        assert 'SIC' not in nc.variables  # a test-set file: no charts
    out = tmp / 'out_cli'
    assert _predict_cli(tmp / 'run', scene, out, '--probabilities') == 0
    name = scene.name.replace('_prep.nc', '')
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f'{name}_charts.nc', f'{name}_quicklook.png', f'{name}_uncertainty.tif']
        + [f'{name}_{c}.tif' for c in ('SIC', 'SOD', 'FLOE')]
    )
    # the evaluation path on the stored copy of the same scene
    st = SceneStore(tmp / 'test.zarr', in_memory=False)
    model, _ = load_checkpoint(res.best_checkpoint or res.last_checkpoint)
    ref = predict_scene(
        model, st.arrays(name), st.meta[name], st.coarse_factor, tile=32, overlap=8, mask_invalid=True
    )
    with netCDF4.Dataset(out / f'{name}_charts.nc') as nc:
        assert nc.data_model == 'NETCDF4' and nc.Conventions.startswith('CF-')
        with netCDF4.Dataset(scene) as src:
            shape80 = (src.dimensions['sar_lines'].size, src.dimensions['sar_samples'].size)
        for c in CHARTS:
            v = nc.variables[c.upper()]
            v.set_auto_mask(False)
            assert v.dtype == np.uint8 and v.shape == shape80 and v._FillValue == 255
            assert (
                list(v.flag_values) == list(range(N_CLASSES[c]))
                and len(v.flag_meanings.split()) == N_CLASSES[c]
            )
            np.testing.assert_array_equal(v[:], upsample_nearest(ref[c], 4, shape80))
        p = nc.variables['SOD_probability']
        p.set_auto_maskandscale(False)
        assert p.shape == (6, *ref['sod'].shape) and p.scale_factor == 0.01
        q = np.asarray(p[:])
        top = np.sort(q, 0)
        ok = (ref['sod'] != 255) & (top[-1] > top[-2])  # stored at 0.01: two classes may round to one value
        np.testing.assert_array_equal(q.argmax(0)[ok], ref['sod'][ok])  # probabilities agree with the classes
        assert nc.variables['lat'].standard_name == 'latitude'
    with rasterio.open(out / f'{name}_SOD.tif') as t:
        assert t.crs.to_epsg() == 3413 and t.dtypes[0] == 'uint8' and t.nodata == 255
        a = t.read(1)
        assert set(np.unique(a)) <= set(range(6)) | {255} and (a != 255).mean() > 0.2
        assert t.colormap(1)[0][:3] == (0, 100, 255)
        assert abs(t.res[0] - 320) < 1e-6  # the model grid: factor 4 x 80 m
    assert imread(out / f'{name}_quicklook.png').shape[1] > 800
    with rasterio.open(out / f'{name}_uncertainty.tif') as t:
        assert t.crs.to_epsg() == 3413 and t.dtypes[0] == 'float32'
        bands = dict(zip(t.descriptions, range(1, t.count + 1)))
        assert {'SOD_confidence', 'SOD_entropy', 'SIC_expected', 'SIC_lower', 'SIC_upper'} <= set(bands)
        assert t.tags(bands['SIC_expected'])['units'] == '%'
        conf = t.read(bands['SOD_confidence'])
        assert np.nanmin(conf) >= 1 / 6 - 1e-6 and np.nanmax(conf) <= 1 + 1e-6  # 6 classes: at least 1/6


def test_onnx_backend_and_int8_within_one_point(world):
    from seaice_nb import cli
    from seaice_nb.inference.export import export_run, real_batches
    from seaice_nb.inference.predict import OnnxModel, load_predictor

    tmp, _, split = world
    rep = export_run(
        tmp / 'run',
        tmp / 'export' / 'unet.onnx',
        split['test'],
        int8=True,
        calibration=split['train'],
        score=True,
    )
    assert rep['within_1e-4'] and set(rep['max_abs_logit_diff']) >= {
        'random_b3_masked',
        'random_tile_96x96',
        'real_0',
    }
    s = rep['score']
    assert s['onnx_fp32'] == s['torch']  # same charts, same pooled score
    assert np.isfinite(s['int8_drop_combined']) and s['onnx_int8']['n_scenes'] == 3
    # int8 vs fp32 on the same weights and the same real tiles: properties of the quantisation, not of how
    # well training went (measured on this tiny U-Net: class agreement >= 0.993 per chart, r >= 0.9996,
    # max error <= 2.8 % of the logit range; the bounds leave a 3-4x margin)
    _, settings = load_predictor(tmp / 'run')
    fp32, int8 = OnnxModel(tmp / 'export' / 'unet.onnx'), OnnxModel(rep['int8']['path'])
    logits = {c: ([], []) for c in CHARTS}
    for scene in split['test']:
        for b in real_batches(settings, scene, 32, 4, 4):
            a, q = fp32(**b), int8(**b)
            for c in CHARTS:
                logits[c][0].append(np.asarray(a[c]))
                logits[c][1].append(np.asarray(q[c]))
    for c, (a, q) in logits.items():
        a, q = np.concatenate(a), np.concatenate(q)
        assert (a.argmax(1) == q.argmax(1)).mean() >= 0.97, c
        assert np.corrcoef(a.ravel(), q.ravel())[0, 1] >= 0.999, c
        assert np.abs(a - q).max() <= 0.1 * (a.max() - a.min()), c
        assert not np.array_equal(a, q)  # the int8 graph really is another computation
    assert (
        rep['int8']['method'] == 'static' and rep['int8']['bytes'] < rep['int8']['fp32_bytes']
    )  # auto: static for a U-Net
    assert json.loads((tmp / 'export' / 'unet.json').read_text())['within_1e-4']
    # the onnx backend of `seaice predict` gives the torch charts
    scene = _alone(world, 1)
    outs = {}
    for b in ('torch', 'onnx'):
        args = [
            'predict',
            str(tmp / 'run'),
            str(scene),
            '--out',
            str(tmp / f'o_{b}'),
            '--tile',
            '32',
            '--overlap',
            '8',
            '--no-geotiff',
            '--no-png',
            '--quiet',
            '--backend',
            b,
            '--threads',
            '1',
        ]
        if b == 'onnx':
            args += ['--onnx', str(tmp / 'export' / 'unet.onnx')]
        assert cli.main(args) == 0
        with netCDF4.Dataset(next((tmp / f'o_{b}').glob('*_charts.nc'))) as nc:
            outs[b] = {c: nc.variables[c.upper()][:].filled(255) for c in CHARTS}
    for c in CHARTS:
        assert (outs['torch'][c] == outs['onnx'][c]).mean() > 0.999


TINY = dict(img_size=16, patch_size=4, dim=32, temporal_depth=1, spatial_depth=1)
FAMILIES = {
    'unet_baseline': ({'filters': [8, 8]}, 1),
    'seaice_tsvit_v1': (TINY, 1),
    'seaice_tsvit_v2': (TINY, 3),
    'seaice_tsvit_v3_early': ({**TINY, 'amsr2_chans': 3, 'era5_chans': 2}, 3),
    'seaice_tsvit_v3_xattn': ({**TINY, 'amsr2_chans': 3, 'era5_chans': 2, 'fusion_depth': 1}, 3),
    'seaice_tsvit_v3_pixel': (
        {**TINY, 'stem': 8, 'refine': 8},
        3,
    ),  # the conv stem and full-resolution decoder
}


@pytest.mark.parametrize('preset', list(FAMILIES))
def test_every_family_exports_and_matches_onnxruntime(preset, tmp_path):
    from seaice_nb.inference.export import check_export, export_onnx
    from seaice_nb.models import create_model

    kw, T = FAMILIES[preset]
    torch.manual_seed(0)
    m = create_model(preset, in_chans=5, **kw)
    for name, mod in m.named_modules():
        if (
            name.endswith('refine') and mod is not None
        ):  # a trained decoder (it starts at zero): its path must export
            torch.nn.init.normal_(mod[-1].weight, std=0.1)
    info = export_onnx(m, tmp_path / 'm.onnx', T)
    assert info['dynamic_tile'] == preset.startswith('unet') and info['tile'] == (
        None if preset.startswith('unet') else 16
    )
    diffs = check_export(m, tmp_path / 'm.onnx', T)
    assert max(diffs.values()) <= 1e-4, diffs
    assert ('random_tile_96x96' in diffs) == preset.startswith(
        'unet'
    )  # other tile sizes only where the architecture allows
    with (
        pytest.raises(ConfigError, match='built for 16-pixel tiles')
        if not preset.startswith('unet')
        else _nothing()
    ):
        export_onnx(m, tmp_path / 'x.onnx', T, tile=32)


def _calibrated_copy(run, dest, temperatures):
    """`run` copied to `dest` with `temperatures` written into the checkpoint consumers load (as training does)."""
    from seaice_nb.training.runs import find_checkpoint, read_checkpoint

    shutil.copytree(run, dest)
    ck = find_checkpoint(dest)
    obj = read_checkpoint(ck)
    obj['meta']['calibration'] = {c: {'temperature': t} for c, t in temperatures.items()}
    torch.save(obj, ck)
    return dest


def test_calibrated_onnx_gives_the_pytorch_calibrated_probabilities(world, tmp_path):
    from seaice_nb.inference import class_probabilities
    from seaice_nb.inference.export import export_run, real_batches
    from seaice_nb.inference.predict import OnnxModel, load_predictor, predict_maps

    tmp, _, split = world
    temps = {'sic': 1.7, 'sod': 2.5, 'floe': 0.6}  # far from 1: a missing or doubled division shows
    run = _calibrated_copy(tmp / 'run', tmp_path / 'run', temps)
    model, settings = load_predictor(run)
    assert settings.temperatures == temps
    rep = export_run(run, tmp_path / 'm.onnx', split['test'][:1])
    assert rep['within_1e-4'] and rep['export']['temperatures_in_graph']
    om = OnnxModel(tmp_path / 'm.onnx')
    assert om.info['temperatures'] == temps
    worst = 0.0
    with torch.no_grad():
        for b in real_batches(settings, split['test'][0], 32, 2, 2):
            ref = class_probabilities(model(**b), temps)  # PyTorch: softmax(logits / T)
            got = class_probabilities(om(**b))  # ONNX: T is in the graph
            worst = max(worst, *(float(np.abs(ref[c] - got[c]).max()) for c in CHARTS))
            raw = class_probabilities(model(**b))
            assert float(np.abs(raw['sod'] - ref['sod']).max()) > 0.01  # the temperature matters
    assert worst <= 1e-5, worst
    # end to end: the calibrated confidence maps of `predict` agree, and both say they are calibrated
    scene = _alone(world, 1)
    a = predict_maps(model, settings, scene, tile=32, overlap=8, progress=False)
    b = predict_maps(om, settings, scene, tile=32, overlap=8, progress=False)
    assert a['calibrated'] and b['calibrated'] and a['temperatures'] == temps
    for k in ('sod_confidence', 'sic_expected', 'floe_entropy'):
        assert np.nanmax(np.abs(a['uncertainty'][k] - b['uncertainty'][k])) <= 1e-5 * (
            100 if 'sic_' in k else 1
        ), k
    for c in CHARTS:
        np.testing.assert_array_equal(a['maps'][c], b['maps'][c])


def _predict_requirements() -> list[str]:
    from configparser import ConfigParser

    cfg = ConfigParser(delimiters=['='])
    cfg.read(Path(__file__).resolve().parent.parent / 'settings.ini')
    return cfg['DEFAULT']['predict_requirements'].split()


def _not_provided(modules: list[str], requirements: list[str]) -> list[str]:
    """Distributions of the imported top-level `modules` outside the dependency closure of `requirements`."""
    import sys
    from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    closure, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in closure:
            continue
        closure.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue
        for q in map(Requirement, dist.requires or []):
            if q.marker is None or any(q.marker.evaluate({'extra': e}) for e in (*req.extras, '')):
                todo.append(q)
    owners = packages_distributions()
    out = set()
    for m in modules:
        if m in sys.stdlib_module_names or m == 'seaice_nb' or m not in owners:
            continue  # the standard library, the package itself, or no installed distribution (builtins)
        dists = {canonicalize_name(d) for d in owners[m]}
        if not dists & closure:
            out |= dists
    return sorted(out)


def test_onnx_export_predicts_alone_without_pytorch(world, tmp_path):
    """`seaice predict MODEL.onnx SCENE.nc` needs neither the checkpoint nor PyTorch (any `import torch` fails in
    the child process) and writes the charts the PyTorch backend writes."""
    import subprocess
    import sys

    import onnx
    from seaice_nb.core import CheckpointError
    from seaice_nb.inference.export import export_run
    from seaice_nb.inference.predict import predict

    tmp, _, _ = world
    model = tmp_path / 'ship' / 'model.onnx'
    export_run(tmp / 'run', model)
    scene = _alone(world, 2)
    child = (
        "import builtins, sys\n"
        "sys.modules['torch'] = None  # from here on, `import torch` raises ImportError\n"
        "direct, _import = set(), builtins.__import__\n"
        "def record(name, globals=None, locals=None, fromlist=(), level=0):  # what seaice_nb itself imports\n"
        "    if level == 0 and (globals or {}).get('__name__', '').startswith('seaice_nb'):\n"
        "        direct.add(name.split('.')[0])\n"
        "    return _import(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = record\n"
        "from seaice_nb import cli\n"
        "rc = cli.main(['predict', *sys.argv[1:4], '--tile', '32', '--overlap', '8', '--quiet'])\n"
        "assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] == 'torch']\n"
        "open(sys.argv[4], 'w').write('\\n'.join(sorted(direct)))\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            '-c',
            child,
            str(model),
            str(scene),
            '--out=' + str(tmp_path / 'onnx'),
            str(tmp_path / 'modules.txt'),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)['backend'] == 'onnx'
    # every package seaice_nb imported on that path is installed by `make predict-env` (predict_requirements)
    missing = _not_provided((tmp_path / 'modules.txt').read_text().split(), _predict_requirements())
    assert not missing, f"add to predict_requirements in settings.ini: {missing}"
    assert _predict_cli(tmp / 'run', scene, tmp_path / 'torch') == 0
    name = scene.name.replace('_prep.nc', '')
    with (
        netCDF4.Dataset(tmp_path / 'onnx' / f'{name}_charts.nc') as a,
        netCDF4.Dataset(tmp_path / 'torch' / f'{name}_charts.nc') as b,
    ):
        for c in ('SIC', 'SOD', 'FLOE'):
            # ONNX and PyTorch logits differ by ~1e-7: only a near-tie between two classes could flip a pixel
            assert (np.asarray(a[c][:]) == np.asarray(b[c][:])).mean() >= 0.999, c
        assert a.getncattr('seaice:checkpoint') == b.getncattr(
            'seaice:checkpoint'
        )  # provenance carried along
    # an export without run settings (written by an older version, or by hand) is refused with what to do
    m = onnx.load(str(model))
    for p in m.metadata_props:
        if p.key == 'seaice':
            info = json.loads(p.value)
            del info['run_settings']
            p.value = json.dumps(info)
    onnx.save(m, str(tmp_path / 'old.onnx'))
    with pytest.raises(CheckpointError, match='carries no run settings.*--backend onnx --onnx'):
        predict(tmp_path / 'old.onnx', scene, tmp_path / 'never')
    assert not (tmp_path / 'never').exists()
    with pytest.raises(ConfigError, match='is an ONNX export'):
        predict(model, scene, tmp_path / 'never', backend='torch')


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_corrupt_or_foreign_scene_fails_naming_it_and_writes_nothing(world):
    import xarray as xr
    from seaice_nb.inference.predict import predict

    tmp, _, split = world
    good = _alone(world, 2)
    bad = tmp / 'bad' / '20210101T000000_dmi_prep.nc'
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:20000])  # truncated download
    out = tmp / 'out_bad'
    with pytest.raises(DataError, match='20210101T000000_dmi_prep.nc.*(corrupt|truncated)'):
        predict(tmp / 'run', bad, out, progress=False)
    assert not out.exists() or not any(out.iterdir())
    ds = xr.open_dataset(good, mask_and_scale=False).load()
    ds.close()
    foreign = tmp / 'bad' / '20210102T000000_dmi_prep.nc'
    ds.drop_vars('nersc_sar_secondary').to_netcdf(foreign)  # a file without HV
    with pytest.raises(DataError, match="nersc_sar_secondary.*missing"):
        predict(tmp / 'run', foreign, out, progress=False)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(
        DataError, match='not earlier than the target'
    ):  # history must be older than the target
        from seaice_nb.inference.predict import load_predictor, scene_inputs

        scene_inputs(good, load_predictor(tmp / 'run')[1], [good])


def test_temporal_model_uses_history_or_falls_back_logged(world, caplog, tmp_path):
    from seaice_nb.bench.predict import make_run
    from seaice_nb.inference.predict import predict

    tmp, _, split = world
    run = make_run('tsvit_v2', tmp_path, factor=4, tiny=True)  # a TSViT v2 run on 3 frames (untrained)
    scenes = sorted(split['train'] + split['test'], key=lambda p: p.name)
    target, history = scenes[-1], scenes[:-1]
    with caplog.at_level(logging.WARNING, logger='seaice_nb'):
        r = predict(run, target, tmp_path / 'single', progress=False, png=False, geotiff=False)
    assert r['frames'] == 1 and 'falling back to single-frame input' in caplog.text
    caplog.clear()
    r = predict(run, target, tmp_path / 'stack', history=history, progress=False, png=False, geotiff=False)
    assert r['frames'] == 3 and 'falling back' not in caplog.text and r['tile'] == 32
    with pytest.raises(ConfigError, match='built for 32-pixel tiles'):
        predict(run, target, tmp_path / 'x', tile=64, progress=False)


def test_ensemble_and_flipped_views_write_their_disagreement(world, tmp_path):
    from seaice_nb import cli
    from seaice_nb.inference.predict import load_predictor, make_ensemble, predict_maps

    tmp, _, _ = world
    scene = _alone(world, 2)
    model, settings = load_predictor(tmp / 'run')
    one = predict_maps(model, settings, scene, tile=32, overlap=8, progress=False)
    twice = predict_maps(
        make_ensemble(model, settings, [tmp / 'run']), settings, scene, tile=32, overlap=8, progress=False
    )
    for c in CHARTS:  # a run averaged with itself: the same charts, no disagreement
        np.testing.assert_array_equal(twice['maps'][c], one['maps'][c])
    for c in ('sod', 'floe', 'sic'):
        d = twice['uncertainty'][f'{c}_disagreement']
        assert np.nanmax(np.abs(d)) <= 1e-5, c
    np.testing.assert_allclose(
        twice['uncertainty']['sod_confidence'], one['uncertainty']['sod_confidence'], atol=1e-5
    )
    assert 'sod_disagreement' not in one['uncertainty']  # only an ensemble has views to disagree
    out = tmp_path / 'tta'
    assert (
        cli.main(
            ['predict', str(tmp / 'run'), str(scene), '--out', str(out), '--tile', '32', '--overlap', '8']
            + ['--tta', '--no-png', '--quiet']
        )
        == 0
    )
    with netCDF4.Dataset(next(out.glob('*_charts.nc'))) as nc:
        v = nc.variables['SOD_disagreement']
        assert v.units == '1' and 'mutual information' in v.long_name
        d = np.asarray(v[:].filled(np.nan))
        assert (
            np.nanmin(d) >= 0 and np.nanmax(d) <= 1 and np.nanmax(d) > 1e-7
        )  # a U-Net is not flip-invariant
    with pytest.raises(ConfigError, match='members must read the same inputs'):
        from seaice_nb.bench.predict import make_run

        make_ensemble(model, settings, [make_run('tsvit_v2', tmp_path / 'v2', factor=4, tiny=True)])
