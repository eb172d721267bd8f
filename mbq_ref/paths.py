"""Where the bundled data lives.

The corpus, tokenizer and tiny model ship in the repository's ``data/`` folder
(``pip install -e .`` keeps it next to the package). ``MBQ_DATA_DIR`` points
elsewhere, e.g. a read-only copy in a teaching lab.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MBQError

__all__ = ["data_dir", "corpus_dir", "model_dir", "DataDirError"]


class DataDirError(MBQError, FileNotFoundError):
    """The bundled data folder (``MBQ_DATA_DIR`` or ``<repo>/data``) is missing or not a folder."""


def data_dir() -> Path:
    """Root of the bundled data: ``$MBQ_DATA_DIR`` or ``<repo>/data``."""
    env = os.environ.get("MBQ_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / "data"
    if root.exists() and not root.is_dir():
        where = f"MBQ_DATA_DIR={env}" if env else str(root)
        raise DataDirError(f"{where} is a file, not a folder; point MBQ_DATA_DIR at the repository's data/ folder "
                           "(or unset it)")  # fmt: skip
    if not root.is_dir():
        raise DataDirError(
            f"bundled data folder {root} not found; install from a clone with "
            "`pip install -e .` or set MBQ_DATA_DIR to the repository's data/ folder"
        )
    return root


def corpus_dir() -> Path:
    return data_dir() / "corpus"


def model_dir(name: str = "tiny-llama") -> Path:
    return data_dir() / name
