"""The newcomer path: README commands, CI script, environment file and pinned torch agree."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    head = (ROOT / "README.md").read_text().split("```bash", 1)[0]
    assert head.count("\n") <= 2, "the quick-start block must come first in the README"
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith('pip install -e ".[dev]"') and "mbq tour" in cmds[0]
    assert cmds[1].startswith('pip install -e ".[dev]"') and cmds[1].endswith("pytest")


def test_ci_runs_exactly_the_readme_commands():
    # .ci/run -> scripts/newcomer.sh extracts the commands with this awk; check it sees the same two lines
    out = subprocess.run(
        ["awk", '/^```bash$/{inb=1; next} inb && /^```$/{exit} inb && NF && !/^#/', "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out == _readme_commands()
    ci = (ROOT / ".ci/run").read_text()
    assert "HF_HUB_OFFLINE=1" in ci and "HF_DATASETS_OFFLINE=1" in ci and "exec scripts/newcomer.sh" in ci
    newcomer = (ROOT / "scripts/newcomer.sh").read_text()
    assert "python3 -m venv" in newcomer and '/^```bash$/{inb=1; next}' in newcomer and "set -euo pipefail" in newcomer


def test_torch_is_pinned_and_conda_installs_the_same():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    assert any(d.startswith("numba-cuda") for d in deps)
    assert '-e ".[dev]"' in (ROOT / "environment.yml").read_text()
