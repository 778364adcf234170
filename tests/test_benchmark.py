"""seaice_nb.benchmark: the benchmark split covers every class; the site search says what is missing."""

import numpy as np
import pytest

from seaice_nb.benchmark import BenchmarkConfig, chart_site_counts, choose_sites, sic_spread
from seaice_nb.evaluation.metrics import N_CLASSES


def test_benchmark_split_covers_every_class():
    """Every default world draw's test sites hold every SOD and FLOE class (icebergs, 0.15 % of the real charts, may be
    missing) and real SIC variance; validation sites may miss the rarest stages, and the split says which."""
    cfg = BenchmarkConfig()
    for ws in cfg.world_seeds:
        counts = chart_site_counts(cfg, world_seed=ws)
        ch = choose_sites(counts, cfg.val_sites, cfg.test_sites, ws, min_sic_var=cfg.min_sic_var)
        assert set(ch['missing']['test']) <= {'floe6'}, (ws, ch['missing'])
        assert not {m for m in ch['missing']['val'] if m.startswith('sic_var')}, (ws, ch['missing'])
        assert not set(ch['val']) & set(ch['test'])
        for part in ('val', 'test'):
            sic = np.array(ch['counts'][part]['sic'], float)
            var, levels = sic_spread(sic)
            assert var > 4.0, (ws, part, var)  # SIC classes spread (sd > 2 classes): R² is meaningful
            assert levels >= 8  # most SIC classes occur


def test_choose_sites_flags_too_little_sic_spread():
    "A test site of solid ice only is flagged (SIC R² would be unscorable); spread elsewhere is fine."
    z = lambda sic: {'sic': np.array(sic), 'sod': np.full(6, 5), 'floe': np.full(7, 5)}
    solid = [0] * 10 + [100]
    spread = [50, 5, 5, 5, 5, 5, 5, 5, 5, 5, 50]
    sites = {0: z(solid), 1: z(solid), 2: z(spread)}
    ch = choose_sites(sites, 1, 1, seed=0, min_pixels=1, min_sic_var=1.0)
    assert ch['n_missing'] == 1 and 'sic_var<1' in ch['missing']['val'] + ch['missing']['test']
    assert sic_spread(solid) == (0.0, 1) and sic_spread(spread)[1] == 11
    assert choose_sites(sites, 1, 1, seed=0, min_pixels=1)['n_missing'] == 0  # not asked: not flagged


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


def test_cli_models_names_ablations_and_refuses_unknown(monkeypatch, tmp_path, capsys):
    "`--models` picks the signals world's models (ablations included) and the knobs-off world's signal models."
    from seaice_nb import benchmark as bm

    seen = {}
    md = tmp_path / 'benchmark.md'
    md.write_text('report\n')

    def run(cfg, root):
        seen['cfg'] = cfg
        return []

    monkeypatch.setattr(bm, 'run_benchmark', run)
    monkeypatch.setattr(bm, 'write_report', lambda cfg, res, out, root: {'md': md})
    assert bm.main(['--models', 'gbm', 'tsvit_v3', 'tsvit_v3_xattn', '--root', str(tmp_path)]) == 0
    assert seen['cfg'].models == {'signals': ['gbm', 'tsvit_v3', 'tsvit_v3_xattn'], 'knobs_off': ['tsvit_v3']}
    assert bm.BenchmarkConfig().models['signals'] == list(bm.BASELINES) + list(
        bm.MAIN_NETWORKS
    )  # no ablations
    with pytest.raises(SystemExit):
        bm.main(['--models', 'tsvit_v9', '--root', str(tmp_path)])
    assert "unknown benchmark model 'tsvit_v9'" in capsys.readouterr().err
