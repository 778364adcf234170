"""House rules for the notebooks in nbs/ that nbdev itself does not enforce."""

import ast, json
from pathlib import Path
import pytest

NBS = Path(__file__).resolve().parent.parent / 'nbs'
LIB_NBS = sorted(p for p in NBS.glob('[0-9]*.ipynb'))


def cells(nb):
    return [(c['cell_type'], ''.join(c['source'])) for c in json.loads(nb.read_text())['cells']]


def directives(src):
    return {l[2:].strip().split()[0] for l in src.splitlines() if l.startswith('#|') and l[2:].strip()}


@pytest.mark.parametrize('nb', LIB_NBS, ids=lambda p: p.name)
def test_skeleton(nb):
    cs = cells(nb)
    assert cs[0][1].startswith('#| default_exp '), f'{nb.name}: first cell must be `#| default_exp <module>`'
    module = cs[0][1].split()[2].removesuffix('.__init__')
    if module == '__init__':  # the package root holds the map of the house
        module = 'layout'
    assert nb.stem.split('_', 1)[1] == module, (
        f'{nb.name} exports {module}: name the notebook NN_{module}.ipynb'
    )
    md = [s for t, s in cs if t == 'markdown']
    assert md and md[0].lstrip().startswith('# ') and '\n> ' in md[0], (
        f'{nb.name}: needs a `# title` and `> summary` cell'
    )
    assert 'nbdev_export()' in cs[-1][1] and 'hide' in directives(cs[-1][1]), (
        f'{nb.name}: last cell must be a hidden nbdev_export()'
    )


@pytest.mark.parametrize('nb', sorted(NBS.glob('*.ipynb')), ids=lambda p: p.name)
def test_doc_build_executes_no_stray_code(nb):
    """nbdev's doc processing executes every non-exported cell that imports something: such cells
    must hold only imports, or `make docs` runs (and breaks on) arbitrary example code."""
    for t, src in cells(nb):
        if t != 'code' or directives(src) & {'export', 'exports', 'exporti', 'exec_doc'}:
            continue
        body = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))
        try:
            tree = ast.parse(body)
        except SyntaxError:
            continue
        nodes = list(ast.walk(tree))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and 'nbdev_export()' not in src:
            other = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not other, (
                f'{nb.name}: move the imports of this cell into a cell of their own:\n{src[:300]}'
            )
