"""seaice_nb.benchmark: the split covers every class, and the world's signal knobs do what they say."""
import numpy as np
import pytest

from seaice_nb.benchmark import BenchmarkConfig, build_world, chart_site_counts, choose_sites, fit_baseline, site_split
from seaice_nb.data import SceneStore
from seaice_nb.metrics import N_CLASSES

FRAMES_OFF, FRAMES_ON, AMSR2_ON = 8.0, 8.0, 8.0   # points; measured margins in the report of issue 12


def test_benchmark_split_covers_every_class():
    "The benchmark world's held-out validation and test sites hold every SOD and FLOE class and real SIC variance."
    cfg = BenchmarkConfig()
    counts = chart_site_counts(cfg)
    ch = choose_sites(counts, cfg.val_sites, cfg.test_sites, cfg.seed)
    assert ch['missing'] == {'val': [], 'test': []}, ch['missing']
    assert not set(ch['val']) & set(ch['test'])
    for part in ('val', 'test'):
        sic = np.array(ch['counts'][part]['sic'], float)
        k = np.arange(N_CLASSES['sic'])
        mean = (sic * k).sum() / sic.sum()
        assert np.sqrt((sic * (k - mean) ** 2).sum() / sic.sum()) > 2.0    # SIC classes spread: R² is meaningful
        assert (sic > 0).sum() >= 8                                        # most SIC classes occur


def test_choose_sites_reports_what_is_missing():
    "With a class in one site only, no partition covers validation and test: the split says which class is missing."
    z = lambda **kw: {c: np.array(kw.get(c, [5] * N_CLASSES[c])) for c in ('sic', 'sod', 'floe')}
    no_bergs = [5, 5, 5, 5, 5, 5, 0]
    sites = {0: z(), 1: z(floe=no_bergs), 2: z(floe=no_bergs), 3: z(floe=no_bergs)}   # bergs only at site 0
    ch = choose_sites(sites, 1, 1, seed=0, min_pixels=1)
    assert ch['n_missing'] == 1 and (ch['missing']['val'] == ['floe6'] or ch['missing']['test'] == ['floe6'])


def _gains(tmp_path, name, temporal, multimodal):
    "Test-site gains (points) of per-pixel gradient boosting: SIC R² from earlier frames, SOD F1 from AMSR2."
    cfg = BenchmarkConfig(sites=8, per_site=3, scene_size=(320, 384), val_sites=1, test_sites=3, workers=1,
                          worlds={name: dict(temporal=temporal, multimodal=multimodal)}, models={name: ['gbm']})
    store = build_world(cfg, name, tmp_path)
    split = site_split(store, 1, 3, seed=0, min_pixels=1)
    st = SceneStore(store, split['train'] + split['test'])
    r = {k: fit_baseline(k, st, split['train'], split['test'], 3, pixels=20_000) for k in ('gbm', 'gbm_frames', 'gbm_frames_amsr2')}
    print(name, {k: (v['sic_r2'], v['sod_f1'], v['combined']) for k, v in r.items()})
    return r['gbm_frames']['sic_r2'] - r['gbm']['sic_r2'], r['gbm_frames_amsr2']['sod_f1'] - r['gbm_frames']['sod_f1']


@pytest.fixture(scope='module')
def gains(tmp_path_factory):
    "The same small world (seed, passes, charts) with the knobs off and with both knobs on."
    d = tmp_path_factory.mktemp('knobs')
    return {w: _gains(d, w, *k) for w, k in {'off': (0.0, 0.0), 'on': (0.4, 1.0)}.items()}


def test_knobs_off_earlier_frames_add_little(gains):
    "Knobs off: earlier frames change a per-pixel classifier's SIC R² on held-out sites by less than FRAMES_OFF points."
    assert abs(gains['off'][0]) < FRAMES_OFF, gains


def test_temporal_knob_puts_information_in_earlier_frames(gains):
    "Temporal knob on: earlier frames raise the held-out SIC R² by FRAMES_ON points more than with the knobs off."
    assert gains['on'][0] - gains['off'][0] > FRAMES_ON, gains


def test_multimodal_knob_puts_information_in_amsr2(gains):
    "Multi-modal knob on: AMSR2 raises the held-out SOD F1 by AMSR2_ON points more than with the knobs off."
    assert gains['on'][1] - gains['off'][1] > AMSR2_ON, gains
