"""SFT baseline: the generator fine-tuned on (profile + query -> target), FlyThinker's prompt form.

FlyThinker with lambda 0 is exactly this model; the paper's main comparison.
"""

from flythinker.methods.lm import LMMethod


class SFT(LMMethod):
    name = "sft"
    style = "profile"
    trainable = True
