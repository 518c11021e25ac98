"""The reference docs agree with the code they describe.

* README's option tables are what ``scripts/options_table.py`` generates from the settings model
  (``server/config.py``) and from ``asr-web``'s parser (``client/web.py``): a new option, a
  changed default or description fails here until the tables are regenerated.
* The model card's rebuild (``train/rebuild_demo.py``) passes only flags its tools accept, and
  its stages are the chain that ``models/demo/train_summary.json`` records.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "train"))

import options_table  # noqa: E402
import rebuild_demo  # noqa: E402


@pytest.mark.parametrize("name", sorted(options_table.RENDER))
def test_readme_option_tables_are_generated_from_the_code(name):
    readme = (ROOT / "README.md").read_text()
    block = options_table.readme_block(readme, name)
    assert block == options_table.render(name), (
        f"README's {name} differ from {options_table.SOURCES[name]}: run .venv/bin/python scripts/options_table.py")


def test_options_table_has_a_row_per_option_with_its_default():
    from server.config import ServerSettings

    rows = [line for line in options_table.render().splitlines() if line.startswith("| `--")]
    assert len(rows) == len(ServerSettings.model_fields)
    port = next(row for row in rows if row.startswith("| `--port` |"))
    assert "`ASR_PORT`" in port and "`50051`" in port
    freeze = next(row for row in rows if row.startswith("| `--gc-freeze`"))
    assert "`--no-gc-freeze`" in freeze and "`true`" in freeze


@pytest.mark.parametrize("name", sorted(options_table.RENDER))
def test_options_table_cells_are_short(name):
    for row in options_table.render(name).splitlines():
        if row.startswith("| `--"):
            meaning = row.rstrip(" |").rsplit(" | ", 1)[-1]
            assert len(meaning) <= options_table.MAX_CELL, row


def test_options_script_rewrites_a_stale_readme_and_check_mode_fails_on_it(tmp_path):
    readme = (ROOT / "README.md").read_text()
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `--port` | `ASR_PORT` |", "| `--port-stale` | `ASR_PORT` |", 1))
    script = str(ROOT / "scripts" / "options_table.py")
    assert subprocess.run([sys.executable, script, "--check", "--readme", str(stale)],
                          capture_output=True).returncode == 1
    assert subprocess.run([sys.executable, script, "--readme", str(stale)], capture_output=True).returncode == 0
    assert options_table.readme_block(stale.read_text()) == options_table.render()
    assert subprocess.run([sys.executable, script, "--check", "--readme", str(stale)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def tool_help() -> dict[str, str]:
    """``--help`` of each tool the rebuild runs."""
    helps = {}
    for name in ("make_data.py", "train_demo.py", "average_models.py"):
        out = subprocess.run([sys.executable, str(ROOT / "train" / name), "--help"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        helps[name] = out.stdout
    return helps


def test_rebuild_passes_only_flags_its_tools_accept(tool_help):
    plan = rebuild_demo.commands(Path("data/demo"), Path("data/rebuild"), python="python")
    assert len(plan) == len(rebuild_demo.STAGES) == 10
    for _, cmds in plan:
        for cmd in cmds:
            tool = Path(cmd[1]).name
            for flag in (arg for arg in cmd[2:] if arg.startswith("--")):
                assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", tool_help[tool]), (tool, flag)


def test_rebuild_stages_are_the_recorded_chain():
    """train_summary.json records, newest first, each stage's steps and what it was averaged with."""
    import json

    summary = json.loads((ROOT / "models" / "demo" / "train_summary.json").read_text())
    chain = []
    while summary is not None:
        chain.append(summary)
        summary = summary.get("fine_tuned_from")
    chain.reverse()
    assert len(chain) == len(rebuild_demo.STAGES)
    for stage, record in zip(rebuild_demo.STAGES, chain):
        assert stage.average_with_previous == ("averaged_with" in record)
        assert (stage.export == "average") == ("averaged_steps" in record)
        assert float(stage.runs[-1][stage.runs[-1].index("--minutes") + 1]) == record["trained_minutes"]
    card = (ROOT / "models" / "demo" / "README.md").read_text()
    steps = [int(m.group(2).replace(" ", "")) for m in
             re.finditer(r"^\| (\d+) \|.*\| ([\d ]+) \|$", card, flags=re.MULTILINE)]
    assert steps == [record["step"] for record in chain]
    assert "make rebuild-demo" in card


# Run labels and references to the work's history: the docs and the code state what is true now.
NARRATION = re.compile(r"\bstops? \d+\b|\bstop-\d+\b|\bmachine [AB]\b|\brun B\d+\b|\bthe issue's\b")


def test_no_run_labels_in_code_tests_or_docs():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "Makefile", "*.cfg", "*.yml", "*.yaml", "*.toml"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    assert len(files) > 100
    found = [f"{name}:{number}: {line.strip()}" for name in files if name != "tests/test_docs.py"
             for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
             if NARRATION.search(line)]
    assert not found, "\n".join(found)
