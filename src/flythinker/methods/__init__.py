"""The methods of the comparison, by name. The runner looks names up here and nowhere else."""

from __future__ import annotations

from flythinker.errors import FlyThinkerError
from flythinker.methods.base import Method, MethodConfig, PredictionRow, RunContext
from flythinker.methods.coconut import Coconut
from flythinker.methods.cot import CoT
from flythinker.methods.flythinker import FlyThinkerMethod
from flythinker.methods.non_personalized import NonPersonalized
from flythinker.methods.rag import RAG
from flythinker.methods.sft import SFT

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NonPersonalized, RAG, SFT, CoT, Coconut, FlyThinkerMethod)
}


def make_method(config: MethodConfig, context: RunContext) -> Method:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise FlyThinkerError(
            f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}"
        ) from None
    return cls(config, context)


__all__ = ["METHODS", "Method", "MethodConfig", "PredictionRow", "RunContext", "make_method"]
