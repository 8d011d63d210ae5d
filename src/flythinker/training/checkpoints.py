"""Resumable training states: ``<output_dir>/states/step-NNNNNNNN/``, the last few kept.

A state is what `accelerate`'s ``save_state`` writes (model, optimizer, scheduler, every
process's RNG states; sharded per process under FSDP and DeepSpeed) plus ``trainer_state.json``:
the step reached, the losses so far and a signature of the data and settings. The data position
needs no saving: it follows from the step (`flythinker.training.steps`).

Writes are atomic: every process writes into ``.step-NNNNNNNN.partial``, and the main process
records a manifest (each file and its size) and renames the directory into place only when all
have finished. A kill at any moment leaves the newest complete state as it was; readers ignore
dot-directories, and the next save clears them away. The final, exported model is not a state:
it is the ``checkpoint/`` directory (`flythinker.training.train.save_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model

from flythinker.errors import FlyThinkerError
from flythinker.io import atomic_directory, replace_file

STATES_DIR = "states"
STATE_NAME = "trainer_state.json"
_STATE_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    losses: list[float] = field(default_factory=list)  # one per completed step
    elapsed_s: float = 0.0  # optimisation time of the steps completed, over all sessions
    signature: dict[str, Any] = field(default_factory=dict)  # what must match to resume
    files: dict[str, int] = field(default_factory=dict)  # manifest: relative path -> bytes


def state_dirs(root: Path) -> list[Path]:
    """Complete states under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STATE_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def read_state(path: Path) -> TrainerState:
    """The trainer state of ``path``, checked against its manifest."""
    try:
        raw = json.loads((path / STATE_NAME).read_text())
        state = TrainerState(**raw)
    except FileNotFoundError:
        raise FlyThinkerError(f"training state {path} is missing {STATE_NAME}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise FlyThinkerError(f"training state {path}: unreadable {STATE_NAME} ({exc})") from None
    for name, size in state.files.items():
        file = path / name
        if not file.is_file():
            raise FlyThinkerError(
                f"training state {path} is missing {name}; delete that directory to resume from "
                "an older state"
            )
        if file.stat().st_size != size:
            raise FlyThinkerError(
                f"training state {path}: {name} has {file.stat().st_size} bytes, expected {size}"
            )
    return state


def save_state(accelerator: Accelerator, root: Path, state: TrainerState, keep_last: int) -> Path:
    """Save a resumable state for ``state.step`` on every process; returns its directory.

    Every process must call this (FSDP and DeepSpeed write one shard each).
    """
    name = f"step-{state.step:08d}"
    final, partial = root / name, root / f".{name}.partial"
    if accelerator.is_main_process:
        _guard(lambda: _fresh_dir(partial), partial)
    accelerator.wait_for_everyone()
    # Pickled, not safetensors: accelerate's safetensors path refuses tied weights (Qwen2.5's
    # embeddings), and these files are only ever read back by this code.
    _guard(lambda: accelerator.save_state(str(partial), safe_serialization=False), partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _guard(lambda: _publish(partial, final, state), partial)
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator: Accelerator, path: Path) -> TrainerState:
    state = read_state(path)
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise FlyThinkerError(f"cannot resume from {path}: {exc}") from exc
    # accelerate restores its micro-batch counter and syncs gradients when it reaches a multiple
    # of grad_accum. A state is saved at an optimizer-step boundary, so counting afresh is the
    # same for an unchanged run, and right for a run resumed with another grad_accum (which a
    # restored count would sync mid-step).
    accelerator.step = 0
    return state


def clear_states(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def _publish(partial: Path, final: Path, state: TrainerState) -> None:
    files = {
        str(p.relative_to(partial)): p.stat().st_size
        for p in sorted(partial.rglob("*"))
        if p.is_file()
    }
    record = asdict(state) | {"files": files}
    # trainer_state.json is written last and names every other file: a directory without it,
    # or with a file missing or short, is not a state.
    (partial / STATE_NAME).write_text(json.dumps(record, indent=1) + "\n")
    if final.exists():  # a damaged state of this step, passed over when the run resumed earlier
        shutil.rmtree(final)
    os.replace(partial, final)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a save that was killed
    path.mkdir(parents=True)


def _prune(root: Path, keep_last: int) -> None:
    for old in state_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _guard(action, partial: Path) -> None:
    """Run a write; if it fails (disk full, permissions) remove the partial state and say so.

    torch.save reports a full disk as a RuntimeError from its zip writer, not an OSError.
    """
    try:
        action()
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise FlyThinkerError(
            f"cannot save the training state to {partial.parent}: {getattr(exc, 'strerror', None) or exc}; "
            "the previous state is intact"
        ) from exc


def rewrite_log(path: Path, last_step: int) -> None:
    """Drop log lines past ``last_step``: steps a killed run took after its last saved state."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and _log_step(line) <= last_step
    ]
    replace_file(path, "".join(line + "\n" for line in kept))


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line (killed mid-write) goes with the steps after the state


# --------------------------------------------------------------------------- best weights

BEST_DIR = "best"
BEST_NAME = "best.json"
BEST_WEIGHTS = "model.safetensors"


def read_best(root: Path) -> dict[str, Any] | None:
    """``{"step", "loss"}`` of the weights kept in ``root`` (`TrainConfig.keep_best`), if any."""
    try:
        return json.loads((root / BEST_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FlyThinkerError(f"kept best weights {root}: unreadable {BEST_NAME} ({exc})") from None


def save_best(model: torch.nn.Module, root: Path, step: int, loss: float) -> None:
    """Replace the weights in ``root`` by ``model``'s, atomically (a kill keeps the previous best).
    Tied tensors are stored once (safetensors' ``save_model``)."""
    with atomic_directory(root) as tmp:
        save_model(model, str(tmp / BEST_WEIGHTS))
        (tmp / BEST_NAME).write_text(json.dumps({"step": step, "loss": loss}) + "\n")


def load_best(model: torch.nn.Module, root: Path) -> dict[str, Any]:
    """Load the weights kept in ``root`` into ``model``; return their ``{"step", "loss"}``."""
    best = read_best(root)
    if best is None:
        raise FlyThinkerError(f"{root} holds no kept best weights ({BEST_NAME} is missing)")
    try:
        load_model(model, str(root / BEST_WEIGHTS))
    except (OSError, RuntimeError, ValueError) as exc:
        raise FlyThinkerError(f"cannot load the kept best weights {root / BEST_WEIGHTS}: {exc}") from None
    return best
