"""The docs site: built from the notebooks (make docs) and opened in a real headless Chromium."""
import functools, html, http.server, os, re, shutil, subprocess, tempfile, threading
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from conftest import require_tool

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-dev-shm-usage', '--window-size=1200,800']


@pytest.fixture(scope='module')
def site(repo):
    r = subprocess.run(['bash', 'tools/docs.sh'], cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = repo / '_docs'
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(docs))
    class Quiet(handler.func):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(docs)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', docs
    srv.shutdown()


def chromium(*args, timeout=90) -> subprocess.CompletedProcess:
    exe = require_tool('chromium', 'chromium')
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', *args],
                              capture_output=True, text=True, timeout=timeout)


def test_site_has_a_page_per_notebook(site, repo):
    _, docs = site
    for nb in (repo / 'nbs').glob('[0-9]*.ipynb'):
        assert (docs / f'{nb.stem}.html').exists(), f'no page for {nb.name}'


@pytest.mark.parametrize('page,expected', [
    ('index.html', ['seaice_nb', 'make demo', 'make test', 'Publishing the docs']),
    ('00_core.html', ['load_config', 'make_run_dir', 'overrides', 'seed_everything', 'atomic_write']),
])
def test_page_renders_in_chromium(site, page, expected):
    url, _ = site
    r = chromium('--dump-dom', f'{url}/{page}')
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    text = re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', '', dom)))  # what a reader sees
    for t in expected: assert t in text, f'{t!r} missing from the rendered {page}'
    if page == '00_core.html':  # documented signatures, not just names in prose
        assert re.search(r'def load_config\( ?src: ?str \| Path \| dict', text), 'load_config signature not rendered'
        assert re.search(r'def make_run_dir\(', text), 'make_run_dir signature not rendered'


def test_screenshot_is_not_blank(site, tmp_path):
    url, _ = site
    png = tmp_path / 'core.png'
    r = chromium(f'--screenshot={png}', f'{url}/00_core.html')
    assert png.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(png).convert('L'), dtype=float)
    assert img.shape[0] >= 700 and img.std() > 10, f'screenshot looks blank (std {img.std():.1f})'
    assert (img < 128).mean() > 0.005, 'no dark pixels: no text rendered'
