"""Seed-compatible entry point, as the original's ``export.py``:

    python -m ssd_pipeline.export --weight W --cfg C --output O

The command itself lives in :mod:`ssd_pipeline.cli`; the export in
:mod:`ssd_pipeline.artifacts.export`.
"""

from __future__ import annotations

from .cli import export_main as main

if __name__ == "__main__":
    raise SystemExit(main())
