"""docs/cli.md's example outputs are the ones scripts/cli_examples.py writes (markers and commands agree)."""

import importlib.util
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("cli_examples", ROOT / "scripts" / "cli_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_marked_block_shows_exactly_the_scripts_commands():
    mod = _script()
    blocks = {m["name"]: m["body"] for m in mod._BLOCK.finditer(mod.DOC.read_text())}
    assert set(blocks) == set(mod.EXAMPLES), "docs/cli.md markers and scripts/cli_examples.py EXAMPLES differ"
    for name, body in blocks.items():
        shown = [ln[2:] for ln in body.splitlines() if ln.startswith("$ ")]
        want = [
            " ".join(shlex.quote(a) if " " in a else a for a in shlex.split(cmd) if a != "--no-progress")
            for cmd in mod.EXAMPLES[name]
            if not cmd.startswith("!")
        ]
        assert shown == want, f"example {name!r} was not written by scripts/cli_examples.py: {shown} vs {want}"
