"""One-file checkpoints: safetensors tensors + JSON metadata, saved atomically, loaded with checks.

Three modules, one job each:

* :mod:`~mbq_ref.checkpoint.format`: the file format every checkpoint shares (header,
  hashes, field and tensor cross-checks, atomic write) and the errors it raises;
* :mod:`~mbq_ref.checkpoint.mobiquant`: the MoBiQuant checkpoint, one file for every
  precision (Sec. 4.1), with its threshold table;
* :mod:`~mbq_ref.checkpoint.static`: the static per-bit checkpoint it replaces.

The public names of all three are importable from here.
"""

from .format import (
    CheckpointError,
    CheckpointWriteError,
    FileFormat,
    ForeignFileError,
    ModelMismatchError,
    TamperedCheckpointError,
    TruncatedCheckpointError,
    VersionMismatchError,
    config_sha256,
    payload_sha256,
)
from .mobiquant import FORMAT, FORMAT_VERSION, MOBIQUANT, Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from .static import STATIC, STATIC_FORMAT, STATIC_FORMAT_VERSION, load_static_checkpoint, save_static_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MOBIQUANT",
    "STATIC",
    "STATIC_FORMAT",
    "STATIC_FORMAT_VERSION",
    "CheckpointError",
    "TruncatedCheckpointError",
    "TamperedCheckpointError",
    "ForeignFileError",
    "VersionMismatchError",
    "ModelMismatchError",
    "CheckpointWriteError",
    "Checkpoint",
    "FileFormat",
    "config_sha256",
    "payload_sha256",
    "read_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "save_static_checkpoint",
    "load_static_checkpoint",
]
