"""FlyThinker: think-while-generating personalized long-form generation (arXiv 2512.06690).

What a user of the README needs, importable from the top: ``from flythinker import FlyThinker``.
(No name here equals a submodule's: importing that submodule would replace it.)
Resolved on first use, so that ``import flythinker`` (and ``flythinker --help``) does not load
torch and transformers before they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FlyThinker": "flythinker.model.flythinker",
    "FlyThinkerConfig": "flythinker.config",
    "GenerationConfig": "flythinker.config",
    "TrainConfig": "flythinker.config",
    "encode_chat": "flythinker.data.prompts",
    "load_longlamp": "flythinker.data.longlamp",
    "compute_metrics": "flythinker.evaluation.metrics",
    "evaluate_texts": "flythinker.evaluation.metrics",
    "FlyThinkerError": "flythinker.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flythinker' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
