"""Non-personalized baseline: the query alone, zero-shot; what the model writes for anyone."""

from flythinker.methods.lm import LMMethod


class NonPersonalized(LMMethod):
    name = "non_personalized"
    style = "query"
