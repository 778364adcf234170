"""The paper figures (nbs/workflows/figures.ipynb) from tiny but real runs: synthetic scenes -> store -> three
tiny U-Nets (two seeds of one configuration, one other) -> evaluation -> figures under papermill.

Checks that every figure of the paper is written as PNG at 300 dpi and as PDF, at the stated printed width,
and that the run comparison groups the seeds. The scores themselves mean nothing (synthetic data, one epoch).
"""

import json

import nbformat
import pytest
from PIL import Image

from seaice_nb.workflows import run_notebook

WIDTH_MM = 174.0


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from seaice_nb.data import DataConfig
    from seaice_nb.evaluate import evaluate
    from seaice_nb.preprocess import PreprocessConfig, preprocess
    from seaice_nb.synth import generate_scenes
    from seaice_nb.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp('paper')
    generate_scenes(tmp / 'scenes', 3, seed=2, size=(160, 200), progress=False)
    preprocess(
        tmp / 'scenes',
        tmp / 'store.zarr',
        PreprocessConfig(factor=4, max_frames=1, chunk=64),
        workers=0,
        progress=False,
    )
    out = []
    for name, seed, filters in (('tiny', 0, [8, 8]), ('tiny', 1, [8, 8]), ('tiny_wide', 0, [12, 12])):
        cfg = TrainConfig(
            name=name,
            seed=seed,
            model='unet_baseline',
            model_kwargs={'filters': filters},
            epochs=1,
            batch_size=4,
            data=DataConfig(store=str(tmp / 'store.zarr'), crop=32),
            progress=False,
        )
        run = tmp / f'{name}_s{seed}'
        res = train(cfg, run_dir=run)
        evaluate(
            res.last_checkpoint,
            tmp / 'store.zarr',
            out_dir=run / 'evaluation' / 'val',
            scene_dir=tmp / 'scenes',
            tile=32,
            overlap=8,
            figures=False,
            progress=False,
        )  # the paper figures are what is tested here
        out.append(run)
    return tmp, out


def test_figures_notebook_writes_every_paper_figure(runs):
    tmp, rs = runs
    nb = run_notebook(
        'figures',
        tmp / 'figures',
        {'runs': [str(r) for r in rs], 'min_pixels': 10, 'width_mm': WIDTH_MM},
        progress=False,
    )
    paper = tmp / 'figures' / 'paper'
    names = ['comparison', 'training_curves', 'confusion', 'conditions'] + [f'maps_{r.name}' for r in rs]
    for n in names:
        for f in ('png', 'pdf'):
            assert (paper / f'{n}.{f}').exists(), (
                f"{n}.{f} missing: {sorted(p.name for p in paper.iterdir())}"
            )
        assert (paper / f'{n}.pdf').read_bytes()[:5] == b'%PDF-'
        im = Image.open(paper / f'{n}.png')
        assert abs(im.info['dpi'][0] - 300) < 1, (n, im.info.get('dpi'))
        assert im.size[0] <= WIDTH_MM / 25.4 * 300 * 1.03, (
            f"{n}: {im.size[0]} px is wider than {WIDTH_MM} mm at 300 dpi"
        )
    table = (paper / 'table_comparison.txt').read_text()
    assert 'tiny_wide' in table and table.count('unet_baseline') == 3
    # the comparison groups the two seeds of `tiny`; the legend says so (figure outputs are in the executed notebook)
    cells = nbformat.read(nb, as_version=4).cells
    src = next(c for c in cells if 'plot_comparison(' in c.source)
    assert any('image/png' in o.get('data', {}) for o in src.outputs)
    printed = ''.join(o.get('text', '') for o in src.outputs if o.get('output_type') == 'stream')
    assert 'tiny (2 seeds)' in printed and 'tiny_wide' in printed, printed
    assert json.loads((tmp / 'figures' / 'figures.json').read_text())['out'] == str(paper)
