"""The public surface (CLI subcommands and options, the seed-compatible export flags, the
pytest options, the scripts) against a committed snapshot, so that a refactor cannot drop
one silently. After a deliberate change, rewrite the snapshot and review its diff:

    .venv/bin/python tests/test_public_surface.py --update
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).with_name("public_surface.json")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in parser._actions for s in a.option_strings)


def surface() -> dict[str, object]:
    from ssd_pipeline.cli import build_parser, export_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p",
                                "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300).stdout
    section = help_text.split("ssd_pipeline:", 1)[1].split("\n\n", 1)[0]
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.sh") if not p.name.startswith("_"))
    return {
        "ssd-pipeline": {"(global)": _options(parser),
                         **{name: _options(p) for name, p in sorted(sub.choices.items())}},
        "python -m ssd_pipeline.export": _options(export_parser()),
        "pytest": sorted(set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", section, re.M))),
        "scripts": scripts,
    }


def test_public_surface_matches_the_snapshot():
    got, want = surface(), json.loads(SNAPSHOT.read_text())
    lost = {k: sorted(set(_flat(want[k])) - set(_flat(got.get(k)))) for k in want}
    added = {k: sorted(set(_flat(got[k])) - set(_flat(want.get(k)))) for k in got}
    lost = {k: v for k, v in lost.items() if v}
    added = {k: v for k, v in added.items() if v}
    assert not lost, f"public surface removed: {lost} (restore it, or update the snapshot)"
    assert not added, (f"public surface added: {added}: run 'python tests/test_public_surface.py"
                       " --update' and commit the snapshot")


def _flat(part: object) -> list[str]:
    if isinstance(part, dict):
        return [f"{k} {o}" for k, opts in part.items() for o in (opts or [""])]
    return list(part or [])


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit(__doc__)
    sys.path.insert(0, str(ROOT))
    SNAPSHOT.write_text(json.dumps(surface(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
