#!/usr/bin/env python
"""`make demo`: the synthetic-data demo end to end, as executed notebooks under runs/demo/.

    python tools/demo.py            # about 6 minutes on 2 cores; rerun to reuse finished steps
    python tools/demo.py --quick    # the smaller variant the tests run
    python tools/demo.py --fresh    # start over
    python tools/demo.py --images docs/images   # also copy the main figures for the README

Generates synthetic AI4Arctic scenes, preprocesses them, trains a small TSViT v2 and the baseline U-Net
briefly on the CPU, evaluates both and draws the comparison figures (seaice_nb.workflows.run_demo).
"""

import os, sys, time
from pathlib import Path

if __name__ == '__main__':
    root = Path(__file__).resolve().parent.parent
    os.chdir(root)  # runs/demo and configs/ relative to the repository, wherever make was called from
    t0 = time.time()
    from seaice_nb.workflows import demo_main

    try:
        rc = demo_main(sys.argv[1:])
    except Exception as e:  # a failed step names its executed notebook; no traceback of the driver
        from seaice_nb.core import SeaIceError

        if not isinstance(e, SeaIceError):
            raise
        print(f"demo: error: {e}", file=sys.stderr)
        rc = 1
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(rc)
