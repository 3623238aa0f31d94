"""Checkpoint writes that a crash cannot half-finish: write a temporary file, fsync, then rename.

``os.replace`` is atomic on POSIX, so a kill -9 during a save leaves either the previous good file or the
new complete one (Lightning's default IO writes in place, and last.ckpt is rewritten on every save).
"""

import os
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
