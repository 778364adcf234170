#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (make readme).

With Quarto installed, `nbdev_readme` does this; without it this script renders the notebook's
markdown cells and visible code cells (directives stripped, `#| hide` cells dropped) with their text
and image outputs. `--check` exits 1 when README.md is out of date.
"""

import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        lines = src.splitlines()
        directives = [l for l in lines if l.startswith('#|')]
        if any(d.split()[1:2] in (['hide'], ['exporti'], ['default_exp']) for d in directives):
            continue
        body = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
        if cell['cell_type'] == 'markdown':
            parts.append(body)
            continue
        if cell['cell_type'] != 'code' or not body:
            continue
        parts.append(f"```python\n{body}\n```")
        for out in cell.get('outputs', []):
            text = out.get('text') or out.get('data', {}).get('text/plain')
            if text:
                parts.append("    " + ''.join(text).rstrip('\n').replace('\n', '\n    '))
    return '\n\n'.join(parts).rstrip() + '\n'


def main(argv):
    text = render(ROOT / 'nbs' / 'index.ipynb')
    readme = ROOT / 'README.md'
    if '--check' in argv:
        if not readme.exists() or readme.read_text() != text:
            print('README.md is out of date with nbs/index.ipynb: run `make readme`')
            return 1
        return 0
    readme.write_text(text)
    print(f'wrote {readme}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
