"""A training run that can be killed with SIGKILL at a chosen write (test_kill_resume.py starts it).

    python train_child.py CONFIG.json count             # run to the end; print the writes (kinds) and the time
    python train_child.py CONFIG.json kill N PHASE      # SIGKILL itself at write N (1-based)
    python train_child.py CONFIG.json run               # run; the parent kills it at a time of its choosing

Writes are calls of what a checkpoint (and the run's JSON files) are written with: `torch.save`, safetensors'
`save_file`, `os.replace` (the renames that publish a file or folder) and `os.fsync`. PHASE says where in write
N the process dies: `before` it, `after` it, or `mid`: a file written by torch.save / save_file is cut to a
random length first, as a file the kernel had only partly written. "ready" is printed once imports are done.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xvla.configio import load_config
from xvla.model import checkpoint as model_checkpoint
from xvla.train.config import TrainConfig
from xvla.train.trainer import train


def main() -> None:
    config, mode, *rest = sys.argv[1:]
    torch.set_num_threads(1)  # as the in-process reference run: the same arithmetic, bit for bit
    kill_at = int(rest[0]) if mode == "kill" else 0
    phase = rest[1] if mode == "kill" else ""
    writes: list[str] = []  # what each write was, in order

    def counted(real: Callable[..., Any], kind: str, path_arg: int | None) -> Callable[..., Any]:
        def write(*args: Any, **kwargs: Any) -> Any:
            writes.append(kind)
            calls = len(writes)
            if calls == kill_at and phase == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if calls == kill_at:
                if phase == "mid" and path_arg is not None:
                    path = Path(args[path_arg])
                    os.truncate(path, random.Random(kill_at).randrange(max(path.stat().st_size, 1)))
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return write

    torch.save = counted(torch.save, "torch.save", 1)
    model_checkpoint.save_file = counted(model_checkpoint.save_file, "save_file", 1)
    os.replace = counted(os.replace, "rename", None)
    os.fsync = counted(os.fsync, "fsync", None)
    print("ready", flush=True)
    start = time.perf_counter()
    train(load_config(TrainConfig, config, []), resume=True)
    print(json.dumps({"writes": writes, "train_s": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
