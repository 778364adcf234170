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
    """Three tiny runs (two seeds of one name, one wider model) on the shared tiny world, each evaluated."""
    from types import SimpleNamespace

    from seaice_nb.testing import fixtures as testing
    from seaice_nb.evaluation.evaluate import evaluate

    tmp = tmp_path_factory.mktemp('paper')
    (tmp / 'scenes').symlink_to(testing.tiny_scenes(), target_is_directory=True)
    (tmp / 'store.zarr').symlink_to(testing.tiny_store(), target_is_directory=True)
    out = []
    for name, seed, filters in (('tiny', 0, [8, 8]), ('tiny', 1, [8, 8]), ('tiny_wide', 0, [12, 12])):
        run = testing.tiny_run(
            name=name, seed=seed, model_kwargs={'filters': filters}, dest=tmp / f'{name}_s{seed}'
        )
        res = SimpleNamespace(last_checkpoint=run / 'checkpoints' / 'last.pt')
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
