"""Run feedback: JSON-lines log, optional TensorBoard, console lines. Only rank 0 writes.

The log file is opened on the first record, so a launch that fails during set-up leaves no file behind.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["RunLogger"]


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    def __init__(self, out_dir: Optional[Path], enabled: bool, tensorboard: bool = False):
        self.enabled = enabled and out_dir is not None
        self.out_dir = out_dir
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None

    @property
    def path(self) -> Path:
        return self.out_dir / "log.jsonl"

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[train] --tensorboard needs the tensorboard package (pip install tensorboard); "
                      "logging to log.jsonl only", file=sys.stderr)
            else:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def drop_records_after(self, step: int) -> int:
        """Removes step/epoch records past ``step`` (a resumed run redoes those steps); returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
            if record.get("type") in ("step", "epoch", "summary") and record.get("step", 0) > step:
                continue
            keep.append(line)
        dropped = len(lines) - len(keep)
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return dropped

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        record = {"type": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
