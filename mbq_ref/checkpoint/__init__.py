"""One-file checkpoints: safetensors tensors + JSON metadata, saved atomically, loaded with checks.

Three modules, one job each:

* :mod:`~mbq_ref.checkpoint.format`: the file format every checkpoint shares (header,
  hashes, field and tensor cross-checks, atomic write) and the errors it raises;
* :mod:`~mbq_ref.checkpoint.mobiquant`: the MoBiQuant checkpoint, one file for every
  precision (Sec. 4.1), with its threshold table;
* :mod:`~mbq_ref.checkpoint.static`: the static per-bit checkpoint it replaces.

The public names of all three are importable from here.
"""

from . import format, mobiquant, static
from .format import *  # noqa: F403 (re-exports: the names each module lists in __all__)
from .mobiquant import *  # noqa: F403
from .static import *  # noqa: F403

__all__ = [*format.__all__, *mobiquant.__all__, *static.__all__]
