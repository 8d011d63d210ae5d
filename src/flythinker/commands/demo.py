"""`flythinker demo`: SFT vs FlyThinker on a real pretrained model, end to end, on a laptop CPU.

The embedded default is SmolLM2-135M-Instruct as both generator and reasoner (the `smollm2-135m`
alias, offline) and the review sample shipped with the package (synthetic users with consistent
voices, written for this project). It is the whole pipeline of `flythinker run`, sized to minutes;
its numbers come from a few dozen examples and a 135M model and say nothing about the paper's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flythinker.commands.run import RunConfig, TaskConfig, run_experiment
from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.prompts import PromptBudgets
from flythinker.methods import MethodConfig

REPRODUCTION = "configs/longlamp_qwen2.5-3b.yaml"


@dataclass(frozen=True)
class DemoSize:
    train_users: int
    test_users: int
    epochs: float
    lr: float
    new_tokens: int
    profile_tokens: int
    target_tokens: int


# Sized for 2 CPU cores, where one training step of a 135M model over 4 examples of ~400 tokens
# takes about 12 s (a FlyThinker step runs two such models): FULL trains 12 steps, QUICK's single
# step only proves the pipeline runs.
QUICK = DemoSize(train_users=4, test_users=3, epochs=1.0, lr=5e-5, new_tokens=32, profile_tokens=128, target_tokens=64)
FULL = DemoSize(train_users=16, test_users=8, epochs=3.0, lr=1e-4, new_tokens=96, profile_tokens=256, target_tokens=96)


# FlyThinker's fusion in the demo. The published pad fusion starts far worse than SFT with a
# same-model pair and ends worse (abstracts: held-out loss 3.44 vs SFT's 2.82); a zero-initialised
# projection starts exactly at SFT and ends there (2.816 vs 2.816): docs/results/start_at_sft.md.
START_AT_SFT = {"fusion": "linear", "projection_init": "zero"}
PUBLISHED = {"fusion": "pad"}


def demo_config(out: str, quick: bool, task: str, data: str, model: str, lam: float = 0.5,
                start_at_sft: bool = True) -> RunConfig:
    """The demo's run: two methods, the same generator, the same data, decoding and budgets."""
    size = QUICK if quick else FULL
    fusion = START_AT_SFT if start_at_sft else PUBLISHED
    return RunConfig(
        out=out,
        tasks=[TaskConfig(task=task, data=data, train_limit=size.train_users, eval_limit=size.test_users)],
        methods=[
            MethodConfig(method="sft", generator=model),
            MethodConfig(method="flythinker", generator=model, reasoner=model, lam=lam, **fusion),
        ],
        training=TrainConfig(epochs=size.epochs, batch_size=4, lr=size.lr),
        generation=GenerationConfig(max_new_tokens=size.new_tokens),
        budgets=PromptBudgets(profile_tokens=size.profile_tokens, query_tokens=96, target_tokens=size.target_tokens),
        decode_batch_size=4,
    )


def demo_command(
    quick: bool = False,
    out: str | None = None,
    task: str = "product_review",
    data: str = "sample",
    model: str = "smollm2-135m",
    lam: float = 0.5,
    start_at_sft: bool = True,
) -> None:
    """Train SFT and FlyThinker briefly on a real 135M model, generate for held-out users, evaluate.

    About 10 minutes on 2 CPU cores (`--quick`: about 1), plus a one-time minute to convert
    the model. Prints the results table and where the outputs, plots and checkpoints are. A rerun
    reuses what the last one finished.

    Args:
        quick: A smaller run (4 training users, 3 held-out users, 32 new tokens): a smoke test.
        out: Run directory (default: runs/demo, or runs/demo-quick with --quick).
        task: LongLaMP task of the data (the shipped sample is product_review).
        data: "sample" (shipped with the package), a local LongLaMP file or directory, or "" to
            load LongLaMP/LongLaMP from the hub (needs network access).
        model: Generator and reasoner: the built-in alias smollm2-135m, a local model directory,
            or a hub id.
        lam: FlyThinker's lambda (published: 0.5).
        start_at_sft: FlyThinker's fusion: a zero-initialised linear projection, which starts
            exactly at SFT (the better of the two on real abstracts), or, with false, the
            published pad fusion, which starts and ends worse than SFT with a same-model pair.
    """
    from flythinker.evaluation.report import format_results, paired_rows

    start = time.perf_counter()
    out = out or ("runs/demo-quick" if quick else "runs/demo")
    config = demo_config(out, quick, task, data, model, lam, start_at_sft)
    results = run_experiment(config)
    minutes = (time.perf_counter() - start) / 60
    run = Path(out)
    print()
    paired = paired_rows(results)  # one bootstrap, for the table and the closing lines
    print(format_results(results, paired))
    print(f"\nfinished in {minutes:.1f} min: {config.tasks[0].eval_limit} held-out users, "
          f"{config.tasks[0].train_limit} training users, {model} fine-tuned for {config.training.epochs:g} "
          f"epoch(s). FlyThinker minus SFT on the same users (paired bootstrap, 95% interval):")
    print("\n".join(comparison_lines(paired)))
    print(
        f"A few users on a CPU: the real-data study with intervals is docs/results/start_at_sft.md; "
        f"the paper's setting (Qwen2.5-3B-Instruct generator, 1.5B reasoner, LongLaMP, GPU) is {REPRODUCTION}.\n"
        f"tables:      {run / 'results.md'} and {run / 'results.csv'}\n"
        f"plots:       {run / 'plots'}\n"
        f"predictions: {run / task}/<method>/predictions.jsonl\n"
        f"checkpoint:  {run / task / 'flythinker' / 'checkpoint'}\n"
        f"try:         flythinker write --checkpoint {run / task / 'flythinker' / 'checkpoint'} "
        f"--profile examples/profile_reviews.json --query \"...\" --show-reasoning"
    )


# What "better" means for each compared quantity: higher scores, lower loss.
_HIGHER_IS_BETTER = {"rouge1": True, "rougeL": True, "meteor": True, "heldout_loss": False}


def comparison_lines(paired: list[dict]) -> list[str]:
    """One line per compared quantity, saying in words what the numbers show and nothing more."""
    lines = []
    for row in paired:
        higher = _HIGHER_IS_BETTER[row["metric"]]
        if row["interval"] == "overlaps":
            verdict = "no measurable difference"
        else:
            better = (row["interval"] == "above") == higher
            verdict = "FlyThinker better" if better else "FlyThinker worse"
        lines.append(
            f"  {row['method']:>12} {row['metric']:>12}: {row['value']:.3f} vs SFT {row['baseline_value']:.3f}, "
            f"difference {row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]: {verdict}"
        )
    return lines or ["  (no paired comparison: SFT and FlyThinker were not evaluated on the same records)"]
