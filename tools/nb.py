#!/usr/bin/env python
"""Authoring helper: round-trip a notebook through jupytext's percent format.

    python tools/nb.py topy nbs/10_scenes.ipynb  [out.py]   # notebook -> editable percent script
    python tools/nb.py build src.py nbs/10_scenes.ipynb      # script -> notebook, executed, cleaned, exported
    python tools/nb.py build src.py nbs/10_scenes.ipynb --no-exec

The notebook stays the source of truth: the script is a scratch copy (keep it out of git).
`build` executes the notebook in nbs/ (so saved outputs reach the docs), runs nbdev_clean on it and
nbdev_export for the whole library.
"""
import subprocess, sys
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


def build(src, nb_path, execute=True):
    nb = jupytext.read(src, fmt='py:percent')
    nb.metadata = {'kernelspec': KERNEL}
    old = Path(nb_path)
    if old.exists():  # keep cell tags (e.g. papermill's `parameters`) written in the script as metadata
        pass
    nbformat.write(nb, nb_path)
    if execute:
        r = subprocess.run([BIN / 'jupyter', 'nbconvert', '--to', 'notebook', '--execute', '--inplace',
                            '--ExecutePreprocessor.timeout=900', str(nb_path)], cwd=Path(nb_path).parent.parent)
        if r.returncode: sys.exit(f"executing {nb_path} failed")
    subprocess.run([BIN / 'nbdev_clean', '--fname', str(nb_path)], check=True)
    subprocess.run([BIN / 'nbdev_export'], check=True)
    print(f"built {nb_path}")


if __name__ == '__main__':
    cmd, *args = sys.argv[1:] or ['-h']
    if cmd == 'topy': topy(*args)
    elif cmd == 'build': build(args[0], args[1], execute='--no-exec' not in args)
    else: print(__doc__)
