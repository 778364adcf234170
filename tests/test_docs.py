"""The docs site: built from the notebooks (make docs) and opened in a real headless Chromium."""

import functools, html, http.server, os, re, shutil, subprocess, tempfile, threading
from pathlib import Path
from urllib.parse import unquote, urlsplit
import numpy as np
import pytest
from PIL import Image
from conftest import require_tool

CHROMIUM_FLAGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    '--window-size=1200,800',
]


# what nbdev's Quarto installer runs (sudo dpkg, pip install -e), and its entry points
TRAPPED = (
    'pip',
    'pip3',
    'sudo',
    'curl',
    'wget',
    'dpkg',
    'apt-get',
    'installer',
    'nbdev_install_quarto',
    'nbdev_install',
)


def trap_path(tmp: Path, names=TRAPPED, log: Path | None = None) -> tuple[str, Path]:
    "A PATH whose first folder holds traps for `names`: each call is logged and fails."
    log = log or tmp / 'trapped.log'
    bin_ = tmp / 'traps'
    bin_.mkdir(parents=True, exist_ok=True)
    for n in names:
        (bin_ / n).write_text(f'#!/bin/sh\necho "{n} $*" >> "{log}"\nexit 97\n')
        (bin_ / n).chmod(0o755)
    path = os.pathsep.join(
        [str(bin_)] + [d for d in os.environ['PATH'].split(os.pathsep) if not (Path(d) / 'quarto').exists()]
    )  # Quarto absent
    return path, log


@pytest.fixture(scope='module')
def site(repo, tmp_path_factory):
    "`make docs` with Quarto absent and pip/sudo/the installer's tools as traps, served over HTTP under a sub-path."
    path, log = trap_path(tmp_path_factory.mktemp('traps'))
    stamp = '.venv/.seaice-installed'  # `make docs` depends on `env`; here the venv is already set up
    cmd = (
        ['make', '--no-print-directory', '-o', stamp, 'docs']
        if (repo / stamp).exists()
        else ['bash', 'tools/docs.sh']
    )
    r = subprocess.run(
        cmd, cwd=repo, capture_output=True, text=True, timeout=600, env={**os.environ, 'PATH': path}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not log.exists(), f"building the docs called: {log.read_text()}"
    docs = repo / '_docs'
    root = tmp_path_factory.mktemp('host')
    (root / 'seaice_nb').symlink_to(docs)  # as on a web host: the site under /seaice_nb/, not at /

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/seaice_nb', docs
    srv.shutdown()


def dead_links(docs: Path) -> list[str]:
    "Every href/src of every page that does not resolve inside the site (missing file or missing anchor)."
    ids: dict[Path, set] = {}

    def page_ids(p):
        if p not in ids:
            ids[p] = set(re.findall(r'\bid="([^"]+)"', p.read_text(errors='replace')))
        return ids[p]

    dead = []
    for page in sorted(docs.rglob('*.html')):
        for url in re.findall(r'\b(?:href|src)="([^"]*)"', page.read_text(errors='replace')):
            url = html.unescape(url)
            u = urlsplit(url)
            if u.scheme or u.netloc:
                continue  # external (http, https, mailto, data: ...)
            target = page if not u.path else (page.parent / unquote(u.path)).resolve()
            if target.is_dir():
                target = target / 'index.html'
            if not target.is_file():
                dead.append(f"{page.relative_to(docs)}: {url}")
                continue
            if u.fragment and target.suffix == '.html' and unquote(u.fragment) not in page_ids(target):
                dead.append(f"{page.relative_to(docs)}: {url} (no such anchor)")
    return dead


def test_dead_links_are_found(tmp_path):
    (tmp_path / 'a.html').write_text(
        '<a href="b.html#x">b</a><a href="c.html">c</a><a href="#top">t</a>'
        '<img src="https://example.org/i.png"><h1 id="top">a</h1>'
    )
    (tmp_path / 'b.html').write_text('<h2 id="y">b</h2>')
    assert dead_links(tmp_path) == ['a.html: b.html#x (no such anchor)', 'a.html: c.html']


def test_every_internal_link_resolves(site):
    _, docs = site
    dead = dead_links(docs)
    assert not dead, f"{len(dead)} dead internal links, e.g.\n" + '\n'.join(dead[:20])
    for page in docs.rglob('*.html'):  # links to the site itself are relative: it works wherever it is opened
        assert 'seaice-nb.github.io/seaice_nb/' not in re.sub(
            r'<meta[^>]*>|<link rel="canonical"[^>]*>', '', page.read_text()
        ), page


def test_sidebar_lists_only_pages(site):
    _, docs = site
    side = re.search(r'<nav id="quarto-sidebar".*?</nav>', (docs / 'index.html').read_text(), re.S).group(0)
    hrefs = re.findall(r'href="([^"]+)"', side)
    assert 'data.scenes.html' in hrefs and 'workflows/train.html' in hrefs, hrefs
    assert all(h.endswith('.html') for h in hrefs), [h for h in hrefs if not h.endswith('.html')]


def test_signature_comments_are_plain_text(site):
    _, docs = site
    sigs = re.findall(
        r'<code class="sourceCode python">(<span class="kw">def</span>.*?)</code>',
        (docs / 'data.scenes.html').read_text(),
        re.S,
    )
    comments = [c for s in sigs for c in re.findall(r'<span class="co">([^<]*)</span>', s)]
    assert any('open_scene' in c for c in comments), comments  # `validate_scene(...)  # as in open_scene`
    assert not [c for c in comments if '`' in c or '](' in c], 'markdown left in signature comments'


def test_docs_with_quarto_use_quarto_and_install_nothing(repo, tmp_path):
    "With a `quarto` on PATH the build renders with it (here a stand-in that writes a page), still installing nothing."
    copy = tmp_path / 'repo'
    for d in ('nbs', 'seaice_nb', 'tools', 'docs'):
        shutil.copytree(
            repo / d, copy / d, ignore=shutil.ignore_patterns('__pycache__', '_proc', '_docs', '*.pt')
        )
    for f in ('settings.ini', 'setup.py'):
        shutil.copy(repo / f, copy / f)
    path, log = trap_path(tmp_path)
    calls = tmp_path / 'quarto.log'
    fake = tmp_path / 'traps' / 'quarto'
    fake.write_text(
        f'#!/bin/sh\necho "$PWD $*" >> "{calls}"\nmkdir -p _docs && echo "<html></html>" > _docs/index.html\n'
    )
    fake.chmod(0o755)
    r = subprocess.run(
        ['bash', 'tools/docs.sh'],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'PATH': path, 'PYTHONPATH': str(copy), 'VENV': str(repo / '.venv')},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not log.exists(), f"building the docs called: {log.read_text()}"
    assert calls.read_text().split() == [str(copy / '_proc'), 'render', '--no-cache']
    assert (copy / '_docs' / 'index.html').exists()
    assert 'nbdev.yml' not in (copy / 'nbs' / 'sidebar.yml').read_text()


def chromium(*args, timeout=90) -> subprocess.CompletedProcess:
    exe = require_tool('chromium', 'chromium')
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def test_site_has_a_page_per_notebook(site, repo):
    _, docs = site
    for nb in (repo / 'nbs').glob(
        '[0-9]*.ipynb'
    ):  # nbdev's page names, as Quarto writes them: 10_scenes -> scenes
        page = re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.stem.lower()) + '.html'
        assert (docs / page).exists(), f'no page {page} for {nb.name}'


@pytest.mark.parametrize(
    'page,expected',
    [
        ('index.html', ['seaice_nb', 'make demo', 'make test', 'Publishing the docs']),
        ('core.html', ['load_config', 'make_run_dir', 'overrides', 'seed_everything', 'atomic_write']),
        (
            'ai4arctic.html',
            [
                'AI4Arctic data card',
                '10.11583/DTU.c.6244065.v2',
                'thick first-year ice',
                '#007800',
                'nersc_sar_primary',
                '-14.508255',
                'Known pitfalls of the official tooling',
            ],
        ),
    ],
)
def test_page_renders_in_chromium(site, page, expected):
    url, _ = site
    r = chromium('--dump-dom', f'{url}/{page}')
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    text = re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', '', dom)))  # what a reader sees
    for t in expected:
        assert t in text, f'{t!r} missing from the rendered {page}'
    if page == 'core.html':  # documented signatures, not just names in prose
        assert re.search(r'def load_config\( ?src: ?str \| Path \| dict', text), (
            'load_config signature not rendered'
        )
        assert re.search(r'def make_run_dir\(', text), 'make_run_dir signature not rendered'


def test_screenshot_is_not_blank(site, tmp_path):
    url, _ = site
    png = tmp_path / 'core.png'
    r = chromium(f'--screenshot={png}', f'{url}/core.html')
    assert png.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(png).convert('L'), dtype=float)
    assert img.shape[0] >= 700 and img.std() > 10, f'screenshot looks blank (std {img.std():.1f})'
    assert (img < 128).mean() > 0.005, 'no dark pixels: no text rendered'


@pytest.fixture(scope='module')
def browser():
    exe = require_tool('chromium', 'chromium')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=exe, args=['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage']
        )
        yield b
        b.close()


def test_browser_follows_a_cross_reference_and_sees_figures(site, browser):
    "A reader opens the index, goes to the scenes page, sees a figure there, and follows an API link to another page."
    url, _ = site
    page = browser.new_page(viewport={'width': 1300, 'height': 900})
    page.goto(f'{url}/index.html')
    page.click('#quarto-sidebar a[href="data.scenes.html"]')
    page.wait_for_url(f'{url}/data.scenes.html')
    widths = page.eval_on_selector_all('main img', 'imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)')
    assert sum(w >= 300 for w in widths) >= 1, (
        f"the scenes page should show its footprint map (image widths {widths})"
    )
    link = page.locator('main a[href^="core.html#"]').first  # e.g. `MissingFileError` in a signature's docs
    href = link.get_attribute('href')
    link.click()
    page.wait_for_url(f'{url}/{href}')
    anchor = href.split('#', 1)[1]
    assert page.locator(f'[id="{anchor}"]').count() == 1, f"{href}: no section {anchor}"
    assert page.title().startswith('core'), page.title()
    page.close()


def test_search_finds_a_function_when_served(site, browser):
    "Search (which loads search.json) works from a web host under a sub-path and leads to the function's page."
    url, _ = site
    page = browser.new_page(viewport={'width': 1300, 'height': 900})
    page.goto(f'{url}/workflows/train.html')  # a page one folder down: the index is found relative to it
    page.fill('#quarto-search input', 'plot_confusion')
    hit = page.locator('.search-result[href*="viz.plots.html"]').first
    hit.wait_for(timeout=15000)
    hit.click()
    page.wait_for_url(f'{url}/viz.plots.html*')
    assert page.locator('#plot_confusion').count() == 1
    page.close()
