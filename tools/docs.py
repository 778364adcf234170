#!/usr/bin/env python
"""Build the documentation site from the notebooks into _docs/ (make docs, via tools/docs.sh).

The steps of `nbdev_docs`, minus the one that makes it unusable on a shared machine: nbdev's
`nbdev_docs` and `nbdev_proc_nbs` both start with `_ensure_quarto()`, which, when Quarto is absent,
runs `sudo dpkg -i` and `pip install -e .[dev]` with whatever `pip` is first on PATH. Here nothing is
installed and nothing outside the checkout is written:

1. `nbs/nbdev.yml` from settings.ini, the symbol index (`seaice_nb/_modidx.py`) and `nbs/sidebar.yml`
   (pages only: notebooks, .qmd and .md, not nbdev.yml/styles.css);
2. nbdev's notebook processing into `_proc/` (show_doc, cross-reference links, directives);
3. fixes on the processed notebooks, so the site works wherever it is opened: links to this site's own
   pages become relative (nbdev writes them absolute, to the published host), and signature comments
   lose their markdown (they sit in a code block, where `[`x`](url)` would show as it is typed);
4. render with Quarto when it is installed, else with smalldocs (pure Python), whose pages get the names
   Quarto would give them (nbdev's `output-file`: `10_data.scenes.ipynb` -> `data.scenes.html`), so the
   cross-reference links of both routes resolve.

    python tools/docs.py            # build _docs/
    python tools/docs.py --renderer smalldocs
"""

import argparse, json, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PAGE_RE = r'\.(?:ipynb|qmd|md)$'  # what the sidebar lists: pages, not the configuration files beside them


def prepare(nbs: Path) -> Path:
    "nbdev's pre-docs steps without `_ensure_quarto`: nbdev.yml, _modidx.py, sidebar.yml, then `_proc/`."
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    import nbdev.doclinks

    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=nbs, file_re=PAGE_RE)
    return proc_nbs(nbs, n_workers=0, force=True)


_LINK = re.compile(r'\[`?([^\]`]+)`?\]\([^)\s]+\)')


def _fix_block(block: str) -> str:
    "Inside a signature's code block: `[`x`](url)` -> x and `x` -> x (comments read as text)."
    body = block[len('```python\n') : -len('\n```')]
    return '```python\n' + _LINK.sub(r'\1', body).replace('`', '') + '\n```'


def fix_links(proc: Path, site_url: str) -> int:
    "Rewrite `site_url/...` links of every processed page to relative ones; plain-text signature comments."
    site_url = site_url.rstrip('/') + '/'
    n = 0
    for p in proc.rglob('*'):
        if p.suffix not in ('.ipynb', '.md', '.qmd') or not p.is_file():
            continue
        rel = '../' * (len(p.relative_to(proc).parts) - 1)
        text = p.read_text()
        n += text.count(site_url)
        text = text.replace(site_url, rel)
        if p.suffix == '.ipynb':
            nb = json.loads(text)
            for cell in nb['cells']:
                for o in cell.get('outputs', []):
                    md = o.get('data', {}).get('text/markdown')
                    if md is None:
                        continue
                    md = ''.join(md) if isinstance(md, list) else md
                    o['data']['text/markdown'] = re.sub(
                        r'```python\n.*?\n```', lambda m: _fix_block(m.group(0)), md, flags=re.S
                    )
            text = json.dumps(nb, indent=1, ensure_ascii=False)
        p.write_text(text)
    return n


_OUT = re.compile(r'^output-file:\s*(\S+)\s*$', re.M)


def output_names(proc: Path) -> dict[str, str]:
    "Give each processed notebook the file name nbdev chose for its page (`output-file`), as Quarto would."
    moved = {}
    for p in sorted(proc.rglob('*.ipynb')):
        nb = json.loads(p.read_text())
        head = ''.join(nb['cells'][0]['source']) if nb['cells'] else ''
        m = _OUT.search(head) if nb['cells'] and nb['cells'][0]['cell_type'] == 'raw' else None
        if not m:
            continue
        nb['cells'][0]['source'] = _OUT.sub('', head)  # smalldocs does not read it: the file name says it now
        target = p.with_name(Path(m.group(1)).stem + '.ipynb')
        if target != p and target.exists():
            raise SystemExit(f"docs: {p.name} and {target.name} would both be {m.group(1)}")
        p.unlink()
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
        moved[p.relative_to(proc).as_posix()] = target.relative_to(proc).as_posix()
    side = proc / 'sidebar.yml'
    if side.exists():
        text = side.read_text()
        for a, b in moved.items():
            text = re.sub(rf'(?<=[\s-]){re.escape(a)}$', b, text, flags=re.M)
        side.write_text(text)
    return moved


def fix_anchors(docs: Path) -> int:
    """Cross-reference links to a symbol without its own section (a private helper named in prose, a method
    documented with its class) point to the class's section, else to the top of the page: never to nothing."""
    ids: dict[Path, set] = {}

    def page_ids(p):
        if p not in ids:
            ids[p] = set(re.findall(r'\bid="([^"]+)"', p.read_text()))
        return ids[p]

    n = 0
    for page in docs.rglob('*.html'):
        text = page.read_text()

        def fix(m, page=page):
            nonlocal n
            path, frag = m.group(1), m.group(2)
            target = (page.parent / path).resolve()
            if not target.is_file() or frag in page_ids(target):
                return m.group(0)
            n += 1
            while '.' in frag and frag not in page_ids(target):
                frag = frag.rsplit('.', 1)[0]
            return f'href="{path}#{frag}"' if frag in page_ids(target) else f'href="{path}"'

        new = re.sub(r'href="([^":#"]+\.html)#([^"]+)"', fix, text)
        if new != text:
            page.write_text(new)
    return n


def render_smalldocs(proc: Path, docs: Path):
    output_names(proc)
    shutil.copy(ROOT / 'nbs' / 'styles.css', proc / 'styles.css')
    for sub in ('images', 'benchmark'):  # figures the index (README) shows
        if (ROOT / 'docs' / sub).exists():
            shutil.copytree(ROOT / 'docs' / sub, proc / 'docs' / sub, dirs_exist_ok=True)
    subprocess.run([str(BIN / 'smalldocs'), 'render', '--quiet', str(proc)], check=True)
    shutil.move(str(proc / '_docs'), str(docs))


def render_quarto(proc: Path, docs: Path, quarto: str):
    for sub in ('images', 'benchmark'):
        if (ROOT / 'docs' / sub).exists():
            shutil.copytree(ROOT / 'docs' / sub, proc / 'docs' / sub, dirs_exist_ok=True)
    subprocess.run([quarto, 'render', '--no-cache'], cwd=proc, check=True)
    shutil.move(str(proc / '_docs'), str(docs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        '--renderer',
        choices=['auto', 'quarto', 'smalldocs'],
        default='auto',
        help='auto: Quarto when `quarto` is on PATH, else smalldocs',
    )
    a = ap.parse_args(argv)
    from nbdev.config import get_config

    cfg = get_config(path=ROOT)
    quarto = shutil.which('quarto')
    renderer = a.renderer if a.renderer != 'auto' else ('quarto' if quarto else 'smalldocs')
    if renderer == 'quarto' and not quarto:
        print(
            'docs: --renderer quarto but `quarto` is not on PATH (install it yourself, or use smalldocs)',
            file=sys.stderr,
        )
        return 2
    docs = ROOT / cfg.doc_path.name
    shutil.rmtree(ROOT / '_proc', ignore_errors=True)
    proc = prepare(cfg.nbs_path)
    n = fix_links(proc, cfg.doc_host + cfg.doc_baseurl)
    shutil.rmtree(docs, ignore_errors=True)
    if renderer == 'quarto':
        render_quarto(proc, docs, quarto)
    else:
        render_smalldocs(proc, docs)
    k = fix_anchors(docs)
    print(
        f"docs site ({renderer}; {n} links made relative, {k} pointed at their page or class): {docs / 'index.html'}"
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
