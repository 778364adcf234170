"""The PyTorch side: sample contract, determinism across workers, augmentation consistency, the rare-class sampler,
sliding tiles, honest splits on the real scene lists, and the loader benchmark at tiny size."""

import datetime as dt, json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCENE_LISTS

from seaice_nb.data.datasets import (
    PatchDataset,
    RareClassSampler,
    SceneDataset,
    SceneStore,
    crop_sample,
    flip_rotate,
    make_loader,
)
from seaice_nb.data.preprocess import PreprocessConfig, preprocess
from seaice_nb.data.splits import (
    SplitConfig,
    check_split,
    load_scene_list,
    make_split,
    official_split,
    scene_records,
)
from seaice_nb.data.synth import generate_scenes

P = 32


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    "Scenes and a store laid out as the loader benchmark makes them, so its tiny run reuses both."
    d = tmp_path_factory.mktemp('data')
    generate_scenes(d / 'scenes', 3, seed=0, size=(200, 240), progress=False)
    s = preprocess(
        d / 'scenes',
        d / 'store_f2.zarr',
        PreprocessConfig(factor=2, max_frames=2, max_days=30),
        workers=2,
        progress=False,
    )
    assert not s['failed']
    return d


@pytest.fixture(scope='module')
def store(workdir):
    return workdir / 'store_f2.zarr'


def test_sample_contract(store):
    ds = PatchDataset(
        store, patch_size=P, n_frames=4, min_valid=0.1
    )  # stored stacks have <= 2 frames: padding
    s = ds[0]
    T, C, cf = 4, len(ds.channels), ds.coarse_factor
    assert s['image'].shape == (T, C, P, P) and s['image'].dtype == torch.float32
    assert s['valid'].shape == (T, P, P) and s['valid'].dtype == torch.bool
    assert s['frame_mask'].shape == (T,) and s['frame_mask'][-1]
    for k in ('doy', 'days_before'):
        assert s[k].dtype == torch.int64 and s[k].shape == (T,)
    for k in ('sic', 'sod', 'floe'):
        assert s[k].shape == (P, P) and s[k].dtype == torch.int64
    assert s['amsr2'].shape == (len(ds.amsr2_channels), P // cf, P // cf)
    assert s['era5'].shape == (len(ds.era5_channels), P // cf, P // cf)
    assert s['days_before'][-1] == 0 and 1 <= s['doy'][-1] <= 366
    pad = ~s['frame_mask']
    assert (s['image'][pad] == 0).all() and not s['valid'][pad].any() and (s['doy'][pad] == 0).all()
    assert s['sic'].max() <= 10 or (s['sic'] == 255).any()
    assert set(s['meta']) == {'scene', 'ice_service', 'region', 'date', 'y0', 'x0'}
    b = next(iter(make_loader(ds, 4, num_workers=0)))
    assert b['image'].shape == (4, T, C, P, P) and len(b['meta']['scene']) == 4


def test_deterministic_across_workers_and_epochs(store):
    ds = PatchDataset(store, patch_size=P, n_frames=2, seed=1)
    dl = lambda w: torch.utils.data.DataLoader(ds, batch_size=3, num_workers=w)
    a, b = next(iter(dl(0))), next(iter(dl(2)))
    assert torch.equal(a['image'], b['image']) and torch.equal(a['sod'], b['sod'])
    x = ds[5]['image']
    ds.set_epoch(1)
    y = ds[5]['image']
    ds.set_epoch(0)
    assert torch.equal(ds[5]['image'], x) and not torch.equal(x, y)


def test_augmentation_moves_image_and_labels_together(store):
    plain = PatchDataset(store, patch_size=P, n_frames=1, augment=False, jitter=False)
    st = plain.store
    si, y0, x0 = plain.windows[3]
    s = crop_sample(st.arrays(st.names[si]), st.meta[st.names[si]], y0, x0, P, P, 1, st.coarse_factor)
    r = flip_rotate(s, 1, True)
    np.testing.assert_array_equal(r['sod'], np.rot90(s['sod'][:, ::-1]))
    np.testing.assert_array_equal(r['image'][0, 0], np.rot90(s['image'][0, 0][:, ::-1]))
    np.testing.assert_array_equal(r['amsr2'][0], np.rot90(s['amsr2'][0][:, ::-1]))
    assert r['sod'].shape == s['sod'].shape


def test_rare_class_sampler_favours_rare_windows(store):
    ds = PatchDataset(store, patch_size=P, n_frames=1)
    h = ds.class_hist['sod']
    freq = h.sum(0) / h.sum()
    rare = int(np.argmin(np.where(freq > 0, freq, np.inf)))
    share = lambda idx: h[idx, rare].sum() / h[idx].sum()
    uniform = share(np.arange(len(ds)))
    drawn = np.array(list(RareClassSampler(ds, 'sod', power=1.0, num_samples=4000, seed=0)))
    assert share(drawn) > 1.5 * uniform
    assert list(RareClassSampler(ds, 'sod', num_samples=20, seed=3)) == list(
        RareClassSampler(ds, 'sod', num_samples=20, seed=3)
    )


def test_sliding_tiles_cover_the_scene(store):
    full = SceneDataset(store)
    tiles = SceneDataset(store, tile=48, overlap=8)
    name = full.store.names[0]
    ref = full[0]
    H, W = full.store.meta[name]['shape']
    canvas = np.full(ref['sod'].shape, 254, np.int64)
    for i, (si, y0, x0, h, w) in enumerate(tiles.items):
        if si != 0:
            continue
        t = tiles[i]['sod'].numpy()
        hh, ww = min(h, canvas.shape[0] - y0), min(w, canvas.shape[1] - x0)
        canvas[y0 : y0 + hh, x0 : x0 + ww] = t[:hh, :ww]
    np.testing.assert_array_equal(canvas[:H, :W], ref['sod'].numpy()[:H, :W])
    assert (ref['sod'].numpy()[H:] == 255).all()


def test_bad_arguments_name_the_fix(store):
    with pytest.raises(Exception, match='multiple of the coarse factor'):
        PatchDataset(store, patch_size=30)
    with pytest.raises(Exception, match="channel 'HH' is not in the store"):
        PatchDataset(store, patch_size=P, channels=['HH'])
    with pytest.raises(Exception, match='not in'):
        SceneStore(store, scenes=['20990101T000000_dmi'])


REAL = SCENE_LISTS / 'dataset.json'


def test_split_has_no_leakage():
    names, prov = load_scene_list(REAL)
    recs = scene_records(names)
    m = make_split(recs, SplitConfig(), scene_list=prov)
    check_split(m)
    by = {it['scene']: it for it in m['items']}
    assert len(by) == len(recs) == 512
    sides = {}
    for it in m['items']:
        if it['split'] != 'excluded':
            sides.setdefault((it['ice_service'], it['region'], it['group']), set()).add(it['split'])
    assert all(len(s) == 1 for s in sides.values())
    # temporally adjacent scenes of one region (within the drift distance) are never on two sides
    for a in recs:
        for b in recs:
            if (
                a['region'] == b['region']
                and a['scene'] < b['scene']
                and abs((a['time'] - b['time']).total_seconds()) <= 3 * 86400
            ):
                sa, sb = by[a['scene']]['split'], by[b['scene']]['split']
                assert sa == sb or 'excluded' in (sa, sb), (a['scene'], b['scene'])
    assert all(
        by[r['scene']]['split'] == 'test' for r in recs if r['region'] in ('SouthEast_RIC', 'SGRDIMID')
    )
    tests = [r for r in recs if by[r['scene']]['split'] == 'test']
    for r in recs:
        if by[r['scene']]['split'] in ('train', 'val'):
            assert not any(
                t['region'] == r['region'] and abs((t['time'] - r['time']).days) < 10 for t in tests
            )
    o = official_split(recs, 10, seed=0)
    assert o['counts']['val'] == 10 and official_split(recs, 10, seed=0)['items'] == o['items']


def test_bench_runs_tiny(workdir):
    from seaice_nb.bench.loader import bench_loader

    r = bench_loader(
        workdir,
        n_scenes=3,
        size=(200, 240),
        factor=2,
        patch=32,
        batch_size=4,
        frames=2,
        n_batches=3,
        warmup=1,
        workers=(0, 2),  # 2: the SlotLoader's ring of shared buffers
        netcdf_batches=1,
        repeats=2,
    )
    assert set(r['results']) == {
        f'{k}_w{w}' for k in ('store_T2', 'lazy_T2', 'netcdf_T1') for w in (0, 2)
    } | {'memcpy'}
    assert all(v['MB_s'] > 0 and len(v['repeats_MB_s']) >= 2 for v in r['results'].values())
    assert 0 < r['ratios']['lazy_fraction_of_memcpy_w0'] and r['ratios']['lazy_vs_netcdf_w0'] > 0
    assert set(r['goals_met']) == {'lazy_vs_netcdf_20x', 'lazy_25pct_memcpy', 'store_40pct_memcpy'}


def test_split_of_a_store_with_spatial_buffer(store):
    from seaice_nb.data.splits import store_records

    recs, fps = store_records(store)
    last = max(recs, key=lambda r: r['time'])
    cfg = SplitConfig(
        test_start=last['date'],
        test_end=last['date'],
        test_regions=[],
        buffer_days=1.0,
        buffer_km=5.0,
        val_fraction=0.0,
    )
    m = make_split(recs, cfg, footprints=fps)
    check_split(m)
    test = [it['scene'] for it in m['items'] if it['split'] == 'test']
    for it in m['items']:
        if it['split'] == 'train':
            r = next(x for x in recs if x['scene'] == it['scene'])
            for t in test:
                tr = next(x for x in recs if x['scene'] == t)
                assert (
                    abs((tr['time'] - r['time']).total_seconds()) > 86400
                    or fps[t].distance(fps[r['scene']]) > 5000
                )
    train = [it['scene'] for it in m['items'] if it['split'] == 'train']
    if train:
        assert not set(PatchDataset(store, train, patch_size=P).store.names) & set(test)


def _rchar() -> int:
    return int(
        next(l for l in Path('/proc/self/io').read_text().splitlines() if l.startswith('rchar:')).split()[1]
    )


def test_lazy_reads_only_the_channels_asked_for(store):
    "One chunk per (frame, channel) plane: a lazy window of 4 of the 18 channels maps only those 4 image planes."
    from seaice_nb.data import datasets as data

    st = SceneStore(store, in_memory=False)
    name = st.names[0]
    meta, cf = st.meta[name], st.coarse_factor
    H, W = meta['shape']

    def planes(chans):
        data._OPEN.clear()
        st._data.clear()
        crop_sample(st.arrays(name), meta, 0, 0, H // cf * cf, W // cf * cf, 1, cf, chans)
        return sorted(f for f in data._OPEN if '/image/' in f)

    assert isinstance(st.arrays(name)['image'], data.PlanarArray)
    assert len(planes(None)) == len(st.channels) and len(planes([0, 1, 2, 3])) == 4
    with pytest.raises(Exception, match='in_memory must be'):
        SceneStore(store, in_memory='sometimes')
