#!/usr/bin/env python
"""Authoring helper: round-trip a notebook through jupytext's percent format.

    python tools/nb.py topy nbs/10_data.scenes.ipynb  [out.py]   # notebook -> editable percent script
    python tools/nb.py build src.py nbs/10_data.scenes.ipynb      # script -> notebook, executed, cleaned, exported
    python tools/nb.py build src.py nbs/10_data.scenes.ipynb --no-exec

The notebook stays the source of truth: the script is a scratch copy (keep it out of git).
`build` executes the notebook in nbs/ (so saved outputs reach the docs), runs nbdev_clean on it and
nbdev_export for the whole library.
"""

import ast, hashlib, subprocess, sys
from pathlib import Path
import jupytext, nbformat

BIN = Path(sys.executable).parent
KERNEL = {'display_name': 'python3', 'language': 'python', 'name': 'python3'}


def topy(nb_path, out=None):
    nb = jupytext.read(nb_path)
    out = out or Path('.dev') / (Path(nb_path).stem + '.py')
    Path(out).parent.mkdir(exist_ok=True)
    jupytext.write(nb, out, fmt='py:percent')
    print(out)


def split_imports(nb):
    """nbdev's doc build executes every non-exported cell that contains an import (anywhere in it): give
    such imports a cell of their own so the example code around them is not run while building the docs."""
    out = []
    for cell in nb.cells:
        src = cell.source
        lines = src.splitlines()
        exported = any(
            l.startswith('#|') and l[2:].split()[:1] in (['export'], ['exports'], ['exporti'], ['exec_doc'])
            for l in lines
        )
        if cell.cell_type != 'code' or exported or 'nbdev_export()' in src:
            out.append(cell)
            continue
        try:
            tree = ast.parse('\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in lines))
        except SyntaxError:
            out.append(cell)
            continue
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not imports or all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
            out.append(cell)
            continue
        hoisted = []
        for n in sorted(imports, key=lambda n: (n.lineno, n.col_offset), reverse=True):
            hoisted.insert(0, ast.unparse(n))
            i = n.lineno - 1
            line = lines[i]
            rest = (line[: n.col_offset] + line[n.end_col_offset :]).strip()
            if n.lineno == n.end_lineno and rest.strip(';').strip():  # `import x; code` on one line
                head = line[: n.col_offset]
                lines[i] = head + line[n.end_col_offset :].lstrip().lstrip(';').lstrip()
            else:
                indent = line[: len(line) - len(line.lstrip())]
                lines[i : n.end_lineno] = [indent + 'pass'] if indent else []
        for i in range(
            len(lines) - 1, -1, -1
        ):  # drop the `pass` placeholders that a sibling statement makes unneeded
            if lines[i].strip() == 'pass':
                ind = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                nxt = lines[i + 1] if i + 1 < len(lines) else ''
                if nxt.startswith(ind) and nxt.strip() and not nxt[len(ind) :].startswith(' '):
                    del lines[i]
        dirs = [l for l in lines if l.startswith('#|')]
        out.append(nbformat.v4.new_code_cell('\n'.join(dirs + list(dict.fromkeys(hoisted)))))
        cell.source = '\n'.join(lines)
        out.append(cell)
    nb.cells = out
    return nb


def build(src, nb_path, execute=True):
    nb = split_imports(jupytext.read(src, fmt='py:percent'))
    nb.metadata = {'kernelspec': KERNEL}
    seen = set()
    for (
        cell
    ) in nb.cells:  # ids from content: a rebuild leaves unchanged cells (and their export markers) alone
        h = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()
        cid, k = h[:8], 0
        while cid in seen:
            k += 1
            cid = hashlib.sha1(f"{h}{k}".encode()).hexdigest()[:8]
        seen.add(cid)
        cell.id = cid
    for cell in nb.cells:  # nbclient does not read nbdev directives: honour `#| eval: false` while executing
        if cell.cell_type == 'code' and any(
            l.replace(' ', '') == '#|eval:false' for l in cell.source.splitlines()
        ):
            tags = cell.metadata.setdefault('tags', [])
            if 'skip-execution' not in tags:
                tags.append('skip-execution')
    nbformat.write(nb, nb_path)
    if execute:
        r = subprocess.run(
            [
                BIN / 'jupyter',
                'nbconvert',
                '--to',
                'notebook',
                '--execute',
                '--inplace',
                '--ExecutePreprocessor.timeout=900',
                str(nb_path),
            ],
            cwd=Path(nb_path).parent.parent,
        )
        if r.returncode:
            sys.exit(f"executing {nb_path} failed")
    subprocess.run([BIN / 'nbdev_clean', '--fname', str(nb_path)], check=True)
    subprocess.run([BIN / 'nbdev_export'], check=True)
    print(f"built {nb_path}")


if __name__ == '__main__':
    cmd, *args = sys.argv[1:] or ['-h']
    if cmd == 'topy':
        topy(*args)
    elif cmd == 'build':
        build(args[0], args[1], execute='--no-exec' not in args)
    else:
        print(__doc__)
