"""CI runs the README's own test command, so a missing install step shows up in CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", text, re.S)
    assert block, "README has no '## Two commands' bash block"
    return [ln for ln in block.group(1).splitlines() if ln and not ln.startswith("#")]


def test_readme_has_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert all(c.startswith("bash scripts/install.sh && ") for c in cmds), cmds


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines(), "the README's test command is not in .ci/run"


def test_measured_tables_come_from_the_committed_records(tmp_path):
    """The README's "Measured here" block is what `ssd-pipeline report --readme` makes from
    fixtures/measured/: edit the records (by a run), never the table."""
    import shutil

    from ssd_pipeline.suite.report import update_readme

    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    measured = ROOT / "fixtures" / "measured"
    changed = update_readme(copy, measured / "perf.json", measured / "accuracy.json")
    assert not changed, ("README's measured block differs from fixtures/measured/: run "
                         "ssd-pipeline report fixtures/measured/perf.json --accuracy "
                         "fixtures/measured/accuracy.json --readme README.md")
