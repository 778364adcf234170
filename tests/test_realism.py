"""seaice_nb.data.realism: the calibrated world holds the real data set's chart statistics; the default world does not."""

import json, subprocess, sys
from pathlib import Path

import pytest

from seaice_nb.core import ConfigError, DataError
from seaice_nb.data.realism import compare, folder_records, statistics
from seaice_nb.data.synth import REALISTIC, WorldConfig, generate_scenes, plan_passes, World

SEAICE = [str(Path(sys.executable).parent / 'seaice')]  # the installed command
DRAWS = range(200, 208)  # the draws the REALISTIC settings were chosen on (checked on 300-307, see 11_synth)


def _world(root, seed, **kw):
    d = root / f"w{seed}"
    generate_scenes(d, 48, seed=seed, size=(400, 480), progress=False, workers=2, **kw)
    return d


@pytest.fixture(scope='module')
def realistic(tmp_path_factory):
    root = tmp_path_factory.mktemp('realistic')
    return [
        _world(root, s, world=WorldConfig(seed=s, **REALISTIC), placement='observed', per_site=1)
        for s in DRAWS
    ]


def test_realistic_world_holds_every_statistic(realistic):
    "Pooled over eight draws of 48 single-pass sites, every held statistic lies within its tolerance."
    recs = [r for d in realistic for r in folder_records(d, 2, progress=False)[0]]
    assert len(recs) == 8 * 48
    rows = compare(statistics(recs))
    held = [r for r in rows if r['held'] is not None]
    assert len(held) == 21
    bad = [
        (r['statistic'], round(r['synthetic'], 2), r['real'], r['tolerance']) for r in held if not r['held']
    ]
    assert not bad, bad


def test_default_world_is_not_realistic(tmp_path):
    "The test-bed world (every site on the ice edge or the coast) fails the major statistics: the check can fail."
    recs, _ = folder_records(_world(tmp_path, 0, per_site=3), 2, progress=False)
    rows = {r['statistic']: r for r in compare(statistics(recs))}
    assert not rows['SOD open water %']['held'] and rows['SOD open water %']['synthetic'] < 50
    assert sum(not r['held'] for r in rows.values() if r['held'] is not None) >= 3


def test_realism_command(realistic, tmp_path):
    "`seaice synth --realism` prints the table and writes the report; mistakes get one clear line."
    rep = tmp_path / 'rep'
    r = subprocess.run(
        SEAICE + ['synth', '--realism', str(realistic[0]), '--report', str(rep), '--workers', '1'],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert '| SOD | SOD open water % |' in r.stdout and 'Sources of the real numbers' in r.stdout
    assert {p.name for p in rep.iterdir()} == {'realism.json', 'realism.md', 'realism.png'}
    j = json.loads((rep / 'realism.json').read_text())
    assert j['n_rows'] == 21 and j['stats']['n_scenes'] == 48
    for args, msg in [
        (['--realism', str(tmp_path / 'none')], 'is not a folder'),
        (['--realism', str(tmp_path)], 'holds no RTT scenes'),
        (['--out', str(tmp_path / 'x'), '--realism', str(tmp_path)], 'not both or neither'),
    ]:
        b = subprocess.run(SEAICE + ['synth'] + args, capture_output=True, text=True)
        assert b.returncode == 1 and msg in b.stderr and 'Traceback' not in b.stderr, b.stderr


def test_realistic_command_writes_the_calibrated_world(tmp_path):
    "`seaice synth --realistic` writes the REALISTIC world with observed placement (its manifest says so)."
    r = subprocess.run(
        SEAICE
        + [
            'synth',
            '--out',
            str(tmp_path),
            '--scenes',
            '2',
            '--size',
            '80',
            '100',
            '--realistic',
            '--workers',
            '1',
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((tmp_path / 'manifest.json').read_text())
    assert m['params']['placement'] == 'observed' and m['params']['world']['stages'] == 'calendar'


def test_new_world_settings_are_checked():
    for kw, msg in [
        (dict(stages='seasons'), "choose 'rules' or 'calendar'"),
        (dict(floe_c0=(0.5, 0.2, 0.9)), 'three rising concentrations'),
        (dict(floe_c0=(0.1, 0.2)), 'three rising concentrations'),
    ]:
        with pytest.raises(ConfigError, match=msg):
            WorldConfig(**kw)
    assert WorldConfig(floe_c0=[0.1, 0.2, 0.3]).floe_c0 == (0.1, 0.2, 0.3)  # a JSON list reads the same
    with pytest.raises(ConfigError, match="choose 'edge_coast' or 'observed'"):
        plan_passes(World(WorldConfig()), 4, placement='anywhere')


def test_records_refuse_bad_charts(realistic, tmp_path):
    "A chart stored as float (not the RTT uint8) is an error naming the file, not a silent histogram."
    import xarray as xr

    f = sorted(realistic[0].glob('*_prep.nc'))[0]
    ds = xr.open_dataset(f).load()
    ds['SIC'] = ds['SIC'].astype('float32')
    bad = tmp_path / 'bad'
    bad.mkdir()
    ds.to_netcdf(bad / f.name)
    with pytest.raises(DataError, match='dtype float32'):
        folder_records(bad, 1, progress=False)
