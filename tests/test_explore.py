"""The explorer driven as a user would: widgets in the kernel, and the panel in JupyterLab under headless Chromium."""

import json, os, secrets, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import numpy as np
import pytest
import torch
import zarr
from matplotlib.backend_bases import MouseEvent, PickEvent

from conftest import require

from seaice_nb.core import DataError, MissingFileError
from seaice_nb.viz.explore import explore, explore_demo
from seaice_nb.charts import CLASS_TABLES
from seaice_nb.data.scenes import destandardise

FLAGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
]
CHANNELS = ['hh', 'hv', 'incidence_angle', 'distance_map']


def tiny_run(root: Path, store: Path, name: str, preset: str, **kw) -> Path:
    "A checkpoint as the trainer writes it (meta with config, channels, frames, preprocessing), initialised with seed 0."
    from seaice_nb.core import to_dict
    from seaice_nb.data.datasets import DataConfig
    from seaice_nb.training.runs import TrainConfig, build_model, save_checkpoint

    cfg = TrainConfig(model=preset, model_kwargs=kw, data=DataConfig(crop=32, n_frames=3, channels=CHANNELS))
    torch.manual_seed(0)
    model = build_model(cfg)
    params = json.loads(json.loads((store / 'zarr.json').read_text())['attributes']['seaice:params'])
    meta = {
        'config': to_dict(cfg),
        'channels': CHANNELS,
        'input_keys': list(model.input_keys),
        'preprocess': {
            k: params[k] for k in ('factor', 'coarse_factor', 'chart_method', 'min_valid', 'grid_offset')
        },
    }
    save_checkpoint(root / name / 'checkpoints' / 'best.pt', model, meta)
    return root / name


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "4 synthetic scenes -> store (2x, stacks of up to 3 frames) + split.json beside it, a tiny TSViT v2 and a tiny U-Net run."
    from seaice_nb.data.preprocess import PreprocessConfig, preprocess
    from seaice_nb.data.splits import official_split, save_manifest, store_records
    from seaice_nb.data.synth import generate_scenes

    root = tmp_path_factory.mktemp('explore')
    generate_scenes(root / 'scenes', 4, seed=0, size=(100, 125), progress=False)
    preprocess(
        root / 'scenes',
        root / 'data' / 'store.zarr',
        PreprocessConfig(factor=2, max_frames=3, max_days=30, chunk=64),
        workers=0,
        progress=False,
    )
    save_manifest(
        official_split(store_records(root / 'data' / 'store.zarr')[0], n_val=1, seed=0),
        root / 'data' / 'split.json',
    )
    tsvit = tiny_run(
        root,
        root / 'data' / 'store.zarr',
        'tsvit_v2',
        'seaice_tsvit_v2',
        in_chans=4,
        img_size=32,
        patch_size=4,
        dim=16,
        temporal_depth=2,
        spatial_depth=2,
        num_heads=2,
    )
    unet = tiny_run(
        root, root / 'data' / 'store.zarr', 'unet_baseline', 'unet_baseline', in_chans=4, filters=[8, 8]
    )
    return root, root / 'data' / 'store.zarr', tsvit, unet


def store_values(store: Path, scene: str) -> dict:
    "The scene's arrays read straight from zarr (not through the explorer)."
    g = zarr.open_group(store / scene, mode='r')
    return {
        k: np.asarray(g[k][...])
        for k in ('image', 'valid', 'sic', 'sod', 'floe', 'lat', 'lon', 'doy', 'days_before', 'era5')
    } | {
        'channels': list(g['image'].attrs['channel_names']),
        'era5_channels': list(g['era5'].attrs['channel_names']),
    }


def click(ex, row: int, col: int):
    "A real matplotlib button press on the scene axes at pixel (row, col)."
    fig = ex.scene_panel.fig
    fig.canvas.draw()
    x, y = ex.scene_panel.ax.transData.transform((col, row))
    fig.canvas.callbacks.process(
        'button_press_event', MouseEvent('button_press_event', fig.canvas, x, y, button=1)
    )


def test_widgets_drive_figure_and_inspector_to_the_store_values(tiny):
    root, store, tsvit, _ = tiny
    ex = explore(store, run=tsvit)
    try:
        names = ex.data.names
        scene = max(names, key=lambda n: ex.data.src.meta[n]['n_frames'])  # a scene with a 3-frame stack
        ex.scene.value = scene  # the picker
        s = store_values(store, scene)
        test_split = json.loads((store.parent / 'split.json').read_text())
        assert any(f"| {it['split']}" in ex.data.src.label(it['scene']) for it in test_split['items'])
        assert ex.map.selected == scene and ex.frame.max == 2 and ex.frame.value == 2
        hh = np.where(
            s['valid'][-1], destandardise(s['image'][-1, 0].astype(np.float64), 'nersc_sar_primary'), np.nan
        )
        np.testing.assert_allclose(ex.scene_panel.base.get_array().filled(np.nan), hh, atol=1e-9)
        np.testing.assert_array_equal(ex.scene_panel.overlay.get_array().filled(255), s['sod'])

        ex.layer.value = 'hv'
        ex.frame.value = 0  # a layer and a frame
        hv0 = np.where(
            s['valid'][0], destandardise(s['image'][0, 1].astype(np.float64), 'nersc_sar_secondary'), np.nan
        )
        np.testing.assert_allclose(ex.scene_panel.base.get_array().filled(np.nan), hv0, atol=1e-9)
        assert (
            f"day of year {int(s['doy'][0])}" in ex.frame_label.value
            and f"{int(s['days_before'][0])} d before" in ex.frame_label.value
        )
        ex.layer.value = 't2m'
        t2m = destandardise(s['era5'][ex.data.src.era5_channels.index('t2m')].astype(np.float64), 't2m')
        assert ex.scene_panel.base.get_array()[7, 9] == pytest.approx(t2m[7 // 4, 9 // 4])
        assert ex.scene_panel.cbar.ax.get_ylabel() == 'ERA5 t2m (K)'

        ex.task.value = 'floe'
        ex.overlay.value = 'chart'
        np.testing.assert_array_equal(ex.scene_panel.overlay.get_array().filled(255), s['floe'])
        assert 'FLOE chart' in ex.legend.value and 'bergs' in ex.legend.value
        assert [t.get_text() for t in ex.scene_panel.legend.get_texts()] == [
            c.name for c in CLASS_TABLES['FLOE']
        ]

        r, c = (int(v) for v in np.argwhere(s['valid'][0] & (s['sod'] != 255))[5])
        click(ex, r, c)  # the pixel inspector
        info = ex.last_inspection
        assert ex.state.pixel == (r, c) and info['frame'] == 0
        assert info['inputs']['hv'][0] == pytest.approx(float(hv0[r, c]), abs=1e-9)
        assert info['lat'] == pytest.approx(float(s['lat'][r, c])) and info['lon'] == pytest.approx(
            float(s['lon'][r, c])
        )
        assert info['charts']['sod'] == (int(s['sod'][r, c]), CLASS_TABLES['SOD'][int(s['sod'][r, c])].name)
        assert (
            f"{float(hv0[r, c]):.2f} dB" in ex.inspector.value and f"{info['lat']:.4f}" in ex.inspector.value
        )
        cls, probs = ex.data.prediction(scene)
        for t, k in (('sic', 11), ('sod', 6), ('floe', 7)):
            p = info['probabilities'][t]
            assert (
                p.shape == (k,)
                and p.sum() == pytest.approx(1, abs=1e-4)
                and info['prediction'][t] == int(p.argmax()) == cls[t][r, c]
            )
        assert ex.scene_panel.marker.get_data()[0][0] == c

        ex.overlay.value = 'error'
        e = ex.scene_panel.overlay.get_array()
        assert e[r, c] == int(cls['floe'][r, c] != s['floe'][r, c]) and e.mask[s['floe'] == 255].all()
        ex.overlay.value = (
            'confidence'  # the uncertainty layer, drawn from the run's (calibrated) probabilities
        )
        conf = ex.scene_panel.overlay.get_array()
        assert conf[r, c] == pytest.approx(float(probs['floe'][:, r, c].max()), abs=1e-6)
        assert 'FLOE confidence' in ex.legend.value and '≥ 90 %' in ex.legend.value
        u = info['uncertainty']['floe']
        assert u['confidence'] == pytest.approx(float(info['probabilities']['floe'].max()), abs=1e-5)
        assert 0 <= u['margin'] <= u['confidence'] and 0 <= u['entropy'] <= 1
        assert (
            info['uncertainty']['sic']['lower']
            <= info['uncertainty']['sic']['expected']
            <= info['uncertainty']['sic']['upper']
        )
        assert f"confidence {u['confidence']:.0%}" in ex.inspector.value
        ex.frame.value = 2  # the inspector follows the frame
        assert ex.last_inspection['frame'] == 2
        assert ex.last_inspection['inputs']['hh'][0] == pytest.approx(float(hh[r, c]), abs=1e-9, nan_ok=True)
        assert set(ex.timings) >= {'scene', 'base', 'frame', 'overlay', 'inspect'}
    finally:
        ex.close()


def test_tsvit_explanations_and_any_model_saliency(tiny):
    root, store, tsvit, unet = tiny
    ex = explore(store, run=tsvit)
    try:
        scene = min(
            ex.data.names, key=lambda n: ex.data.src.meta[n]['n_frames']
        )  # 1 frame: the stack is padded to 3
        ex.scene.value = scene
        ex.task.value = 'sic'
        ex.inspect(20, 30)
        e = ex.scene_panel.explanation
        assert e['temporal'].shape == (2, 3) and np.allclose(e['temporal'].sum(1), 1)
        assert [f['padding'] for f in e['frames']] == [True, True, False]
        assert np.all(e['temporal'][:, :2] == 0)  # padded frames get no attention
        ex.overlay.value = 'rollout'
        assert ex.scene_panel.expl.get_visible() and ex.scene_panel.expl.get_array().max() == pytest.approx(1)
        ex.overlay.value = 'saliency'
        np.testing.assert_array_equal(ex.scene_panel.expl.get_array(), e['saliency'])
        assert len(ex.explain_panel.att.patches) == 3 and len(ex.explain_panel.prob.patches) == 11
    finally:
        ex.close()
    ex = explore(store, run=unet)
    try:
        ex.inspect(10, 10)
        e = ex.scene_panel.explanation
        assert e['temporal'] is None and e['rollout'] is None and e['saliency'].max() == 1
        assert 'TSViT runs only' in ex.explain_panel.att.texts[0].get_text()
    finally:
        ex.close()


def test_footprint_click_opens_the_scene_and_filter_narrows_the_picker(tiny):
    root, store, _, _ = tiny
    ex = explore(store)
    try:
        other = ex.data.names[2]
        patch = ex.map.patches[other]
        fig = ex.map.fig
        fig.canvas.draw()
        me = MouseEvent('button_press_event', fig.canvas, 0, 0, button=1)
        fig.canvas.callbacks.process('pick_event', PickEvent('pick_event', fig.canvas, me, patch))
        assert ex.scene.value == other and ex.state.scene == other and ex.map.selected == other
        assert ex.overlay.options == ('none', 'chart')  # no model: no prediction layers
        ex.filter.value = other[:13]
        assert [v for _, v in ex.scene.options] == [n for n in ex.data.names if n.startswith(other[:13])]
    finally:
        ex.close()


def test_demo_layout_opens_in_one_call_and_bad_input_is_named(tiny, tmp_path):
    root, store, tsvit, _ = tiny
    ex = explore_demo(root)  # <root>/data/store.zarr + <root>/tsvit_v2
    try:
        assert ex.data.checkpoint == tsvit / 'checkpoints' / 'best.pt' and ex.data.tsvit is not None
    finally:
        ex.close()
    with pytest.raises(MissingFileError, match='make demo'):
        explore_demo(tmp_path)
    with pytest.raises(MissingFileError, match='does not exist'):
        explore(tmp_path / 'nope')
    with pytest.raises(DataError, match='not in the source'):
        explore(store, scene='20000101T000000_dmi')
    bad = tiny_run(tmp_path, store, 'bad', 'unet_baseline', in_chans=4, filters=[8, 8])
    ck = torch.load(bad / 'checkpoints' / 'best.pt', weights_only=True)
    ck['meta']['channels'] = ['hh', 'hv', 'sst', 'distance_map']
    torch.save(ck, bad / 'checkpoints' / 'best.pt')
    with pytest.raises(DataError, match="lacks channel.*sst"):
        explore(store, run=bad)


# ---------------------------------------------------------------- JupyterLab in headless Chromium

NOTEBOOK_CELLS = [
    "%matplotlib widget",
    "from seaice_nb.viz.explore import explore\nex = explore({store!r}, run={run!r})\nex",
    "ex.inspect(20, 30);",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_all(page, timeout: float):
    "Run every cell through JupyterLab's Run menu and wait for the explorer, its inspector and its canvases."
    page.locator('.jp-Notebook .jp-Cell').first.wait_for(timeout=timeout * 1000)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator, .jp-Dialog', timeout=timeout * 1000)
    dialog = page.locator('.jp-Dialog')  # "Select Kernel" may be asked although the notebook names one
    for _ in range(20):
        if dialog.count():
            dialog.locator('.jp-mod-accept').first.click()
            break
        if page.locator('text=Python 3 (ipykernel) | Idle').count():
            break
        page.wait_for_timeout(250)
    page.keyboard.press('Control+b')  # close the file browser: room for the panel
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
    page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click()
    page.locator('.seaice-explorer').wait_for(timeout=timeout * 1000)
    page.locator('.seaice-inspector').wait_for(
        timeout=timeout * 1000
    )  # the last cell ran: a pixel is inspected
    page.wait_for_function(
        DRAWN + ' >= 3', timeout=timeout * 1000
    )  # map, scene and explanation canvases show images


DRAWN = """[...document.querySelectorAll('.seaice-explorer canvas')].filter(c => {
    if (!c.width || !c.height) return false;                  // an ipympl figure: an image canvas + a clear rubber-band canvas
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4 * 13) if (d[i + 3] > 0 && (d[i] < 230 || d[i + 1] < 230 || d[i + 2] < 230)) n++;
    return n > 30;
}).length"""


def open_in_lab(store: Path, run: Path, work: Path, screenshot: Path, timeout: float = 50) -> dict:
    "Start JupyterLab on a notebook calling `explore`, run all cells from the UI in headless Chromium; DOM facts + screenshot."
    import nbformat
    from playwright.sync_api import sync_playwright

    work.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c.format(store=str(store), run=str(run))) for c in NOTEBOOK_CELLS]
    )
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, work / 'explore.ipynb')
    port, tok = _free_port(), secrets.token_hex(8)
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).parents[1]),
        JUPYTERLAB_SETTINGS_DIR=str(work / '.settings'),
        JUPYTERLAB_WORKSPACES_DIR=str(work / '.workspaces'),
        JUPYTER_RUNTIME_DIR=str(work / '.runtime'),
        MPLBACKEND='',
    )
    env.pop('MPLBACKEND')
    notify = work / '.settings' / '@jupyterlab' / 'apputils-extension' / 'notification.jupyterlab-settings'
    notify.parent.mkdir(parents=True, exist_ok=True)
    notify.write_text('{"fetchNews": "false"}')  # no news toast over the panel
    log = open(work / 'lab.log', 'w')
    lab = subprocess.Popen(
        [
            str(Path(sys.executable).parent / 'jupyter'),
            'lab',
            '--no-browser',
            '--ip',
            '127.0.0.1',
            '--port',
            str(port),
            f'--IdentityProvider.token={tok}',
            f'--ServerApp.root_dir={work}',
            '--LabApp.news_url=None',
            '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
            '--LabApp.extension_manager=readonly',
        ]
        + (['--allow-root'] if os.geteuid() == 0 else []),
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    t0, facts = time.time(), {}
    try:
        while True:
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={tok}', timeout=2)
                break
            except OSError:
                if lab.poll() is not None or time.time() - t0 > 30:
                    raise RuntimeError((work / 'lab.log').read_text()[-2000:])
                time.sleep(0.3)
        facts['server_s'] = round(time.time() - t0, 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path='/usr/bin/chromium', args=FLAGS)
            page = browser.new_page(viewport={'width': 1560, 'height': 1300})
            page.goto(f'http://127.0.0.1:{port}/lab/tree/explore.ipynb?token={tok}')
            try:
                _run_all(page, timeout)
            except Exception:
                page.screenshot(path=str(work / 'failed.png'))
                raise AssertionError(
                    f"explorer did not render; page text: {page.evaluate('document.body.innerText')[-1500:]!r}; "
                    f"screenshot {work / 'failed.png'}; log: {(work / 'lab.log').read_text()[-1500:]}"
                ) from None
            panel = page.locator('.seaice-explorer')
            panel.scroll_into_view_if_needed()
            facts.update(
                page.evaluate(
                    """() => {
                const p = document.querySelector('.seaice-explorer');
                const figs = [...p.querySelectorAll('.jupyter-matplotlib-figure, .jupyter-matplotlib')].length;
                return {text: p.innerText, canvases: p.querySelectorAll('canvas').length, figures: figs, drawn: """
                    + DRAWN
                    + """,
                        options: p.querySelectorAll('.seaice-scene-picker option').length,
                        legend: (p.querySelector('.seaice-legend') || {}).innerText || '',
                        errors: document.body.innerText.match(/Error displaying widget|Failed to load model|Traceback/g) || []};
            }"""
                )
            )
            panel.screenshot(path=str(screenshot))
            facts['seconds'] = round(time.time() - t0, 1)
            browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(10)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
    return facts


def test_explorer_renders_in_jupyterlab_under_headless_chromium(tiny, tmp_path):
    require(Path('/usr/bin/chromium').exists(), 'chromium is not installed')
    from PIL import Image

    root, store, tsvit, _ = tiny
    png = tmp_path / 'explore.png'
    facts = open_in_lab(store, tsvit, tmp_path / 'lab', png)
    assert not facts['errors'], facts['errors']
    assert facts['drawn'] == 3 and facts['options'] == 4  # map, scene, explanations drawn; the picker
    assert (
        'seaice_nb explorer' in facts['text'] and 'lat, lon' in facts['text'] and 'model SOD' in facts['text']
    )
    assert 'SOD chart' in facts['legend'] and 'open water' in facts['legend'] and 'old ice' in facts['legend']
    im = np.asarray(Image.open(png).convert('RGB')).astype(int)
    assert im.shape[0] > 300 and im.shape[1] > 900 and im.std() > 20  # not blank

    def has(colour, tol=6):
        c = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(im - c).max(-1) <= tol).sum())

    assert all(has(c.colour) > 20 for c in CLASS_TABLES['SOD']), [
        (c.name, has(c.colour)) for c in CLASS_TABLES['SOD']
    ]  # the legend's WMO colours
    assert has('#ff0000', tol=40) > 10  # the map's selected footprint
    print(json.dumps({k: v for k, v in facts.items() if k in ('server_s', 'seconds')}))
