"""seaice_nb.benchmark: the benchmark split covers every class; the site search says what is missing."""

import numpy as np
import pytest

from seaice_nb.benchmark import BenchmarkConfig, chart_site_counts, choose_sites
from seaice_nb.metrics import N_CLASSES


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
        assert (
            np.sqrt((sic * (k - mean) ** 2).sum() / sic.sum()) > 2.0
        )  # SIC classes spread: R² is meaningful
        assert (sic > 0).sum() >= 8  # most SIC classes occur


def test_choose_sites_reports_what_is_missing():
    "With a class in one site only, no partition covers validation and test: the split says which class is missing."
    z = lambda **kw: {c: np.array(kw.get(c, [5] * N_CLASSES[c])) for c in ('sic', 'sod', 'floe')}
    no_bergs = [5, 5, 5, 5, 5, 5, 0]
    sites = {0: z(), 1: z(floe=no_bergs), 2: z(floe=no_bergs), 3: z(floe=no_bergs)}  # bergs only at site 0
    ch = choose_sites(sites, 1, 1, seed=0, min_pixels=1)
    assert ch['n_missing'] == 1 and (ch['missing']['val'] == ['floe6'] or ch['missing']['test'] == ['floe6'])


def test_choose_sites_without_test_sites():
    "A validation-only split (the demo's): only validation must cover every class; the site holding the rare class goes there."
    z = lambda **kw: {c: np.array(kw.get(c, [5] * N_CLASSES[c])) for c in ('sic', 'sod', 'floe')}
    no_bergs = [5, 5, 5, 5, 5, 5, 0]
    sites = {0: z(), 1: z(floe=no_bergs), 2: z(floe=no_bergs), 3: z(floe=no_bergs)}
    ch = choose_sites(sites, 1, 0, seed=0, min_pixels=1)
    assert ch['val'] == [0] and ch['test'] == [] and ch['missing'] == {'val': [], 'test': []}
