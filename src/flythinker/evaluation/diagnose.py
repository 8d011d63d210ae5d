"""Why does the published fusion start worse than SFT? Target loss under controlled signals.

For a reasoner/generator pair and a LongLaMP file, before any training, this measures the
generator's teacher-forced loss on the records' targets (profile prompts, as training builds them)
when the reasoning signal is

- the published one, ``lam * rescale(h_{i-1})`` padded into the generator's space, at each lambda
  asked for (lambda 0 is SFT's starting point);
- and, at one control lambda, the same signal with one property changed:
  ``random`` (random directions, same norm: is it the size or the direction?), ``centred`` (each
  vector minus the mean vector of the batch: is it a shared offset?), ``targets_only`` (no signal
  on prompt positions: is it the prompt's reading that breaks?), ``linear`` (a randomly
  initialised projection instead of padding: another direction, same norm).

It also reports what the vectors look like: their raw norm against the embedding table's, their
cosine with the embedding of the token that follows (``e_G(s_i)`` for ``h_{i-1}``), and how often
the embedding row nearest to ``h_{i-1}`` is exactly that next token ("next-token concentration").
A high concentration is the init shock's mechanism: the generator reads the next token as already
present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flythinker.config import FlyThinkerConfig
from flythinker.data.collate import collate, encode, pad_id
from flythinker.data.longlamp import load_longlamp
from flythinker.data.prompts import PromptBudgets, records_to_examples
from flythinker.errors import FlyThinkerError
from flythinker.io import write_json
from flythinker.model.decoding import position_ids_from_mask
from flythinker.model.flythinker import FlyThinker
from flythinker.model.fusion import Fusion
from flythinker.training.train import token_cross_entropy_sum

CONTROLS = ("random", "centred", "targets_only", "linear")


@torch.no_grad()
def diagnose(
    model: FlyThinker,
    batches: Sequence[dict[str, torch.Tensor]],
    lams: Sequence[float] = (0.0, 0.1, 0.2, 0.5, 1.0),
    control_lam: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Target loss per token for each lambda and control, and the vectors' figures.

    ``batches`` are collated training batches (input_ids, attention_mask, labels). The model's
    own ``lam`` and gate are ignored: the published signal is rebuilt here with rescale and
    padding (or its linear projection when the model has one).
    """
    model.eval()
    d_r, d_g, device = model.reasoner_width, model.generator_width, model.generator.device
    if d_r > d_g:
        raise FlyThinkerError(f"the published (pad) fusion needs d_R <= d_G; this pair has {d_r} > {d_g}")
    published = Fusion(FlyThinkerConfig(lam=1.0, fusion="pad"), d_r, d_g, torch.float32, device)
    torch.manual_seed(seed)  # the linear control's projection
    linear = Fusion(FlyThinkerConfig(lam=1.0, fusion="linear", projection_init="random"), d_r, d_g, torch.float32, device)
    generator = torch.Generator().manual_seed(seed)
    norm_target = model.target_norm()
    table = model.generator.get_input_embeddings().weight.detach().float()

    totals: dict[str, list[float]] = {}
    figures = {"h_norm": [], "cos_next": [], "next_concentration": []}
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        position = position_ids_from_mask(mask)
        h = model.reason(ids, mask, position).last_hidden_state.float()
        real = mask.bool()
        previous_real = F.pad(real[:, :-1], (1, 0), value=False)  # position i gets h_{i-1}
        signal_unit = _shift(published(h, norm_target))
        tokens = int((labels[:, 1:] != -100).sum())

        def loss(signal: torch.Tensor, ids=ids, mask=mask, position=position, labels=labels,
                 gate=previous_real[..., None]) -> float:
            return _target_loss(model, ids, mask, position, labels, signal * gate)

        for lam in lams:
            totals.setdefault(f"lambda={lam:g}", [0.0, 0])
            _add(totals[f"lambda={lam:g}"], loss(lam * signal_unit), tokens)
        controls = {
            "random": _shift(published(_random_like(h, generator), norm_target)),
            "centred": _shift(published(h - h[real].mean(0), norm_target)),
            "targets_only": signal_unit * (labels != -100)[..., None],
            "linear": _shift(linear(h, norm_target)),
        }
        for name, signal in controls.items():
            totals.setdefault(f"{name} (lambda={control_lam:g})", [0.0, 0])
            _add(totals[f"{name} (lambda={control_lam:g})"], loss(control_lam * signal), tokens)

        # The vectors themselves: h_{i-1} against the embedding of s_i, at real positions.
        h_prev = h[:, :-1][previous_real[:, 1:]]
        next_ids = ids[:, 1:][previous_real[:, 1:]]
        padded = F.pad(h_prev, (0, max(model.generator_width - h_prev.shape[-1], 0)))[:, : model.generator_width]
        figures["h_norm"] += h_prev.norm(dim=-1).tolist()
        figures["cos_next"] += F.cosine_similarity(padded, table[next_ids], dim=-1).tolist()
        nearest = (padded @ table.T).argmax(-1)
        figures["next_concentration"] += (nearest == next_ids).float().tolist()

    losses = {name: total / max(count, 1) for name, (total, count) in totals.items()}
    mean = {k: sum(v) / max(len(v), 1) for k, v in figures.items()}
    return {
        "target_loss": losses,
        "figures": {
            "reasoner_vector_norm": mean["h_norm"],
            "embedding_norm": float(norm_target),
            "cosine_with_next_token_embedding": mean["cos_next"],
            "next_token_concentration": mean["next_concentration"],
            "positions": len(figures["h_norm"]),
        },
        "control_lambda": control_lam,
    }


@torch.no_grad()
def signal_ablation(model: FlyThinker, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Does a *trained* FlyThinker use its reasoning signal? Target loss per token as trained,
    and with the signal switched off (lambda 0, same weights); and the signal's mean norm per
    position against the embedding rows'.

    A gap near zero means the generator learned to do without the signal: whatever FlyThinker
    scores then comes from its generator's fine-tuning alone.
    """
    model.eval()
    fusion = model.fusion
    totals = {"as trained": [0.0, 0], "signal off (lambda 0)": [0.0, 0]}
    norms: list[float] = []
    saved_scale = fusion.lam_scale
    try:
        for batch in batches:
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            tokens = int((labels[:, 1:] != -100).sum())
            fusion.lam_scale = saved_scale
            out = model(ids, mask)
            _add(totals["as trained"], float(token_cross_entropy_sum(out.logits, labels)), tokens)
            norms += model.reasoning_signal(out.reasoning).float().norm(dim=-1)[mask.bool()].tolist()
            fusion.lam_scale = 0.0
            _add(totals["signal off (lambda 0)"], float(token_cross_entropy_sum(model(ids, mask).logits, labels)), tokens)
    finally:
        fusion.lam_scale = saved_scale
    losses = {name: total / max(count, 1) for name, (total, count) in totals.items()}
    return {
        "target_loss": losses,
        "signal_gain": losses["signal off (lambda 0)"] - losses["as trained"],
        "signal_norm": sum(norms) / max(len(norms), 1),
        "embedding_norm": float(model.target_norm()),
    }


def _target_loss(model, ids, mask, position, labels, signal) -> float:
    embeds = model.generator.get_input_embeddings()(ids)
    logits = model.generator(inputs_embeds=embeds + signal.to(embeds.dtype), attention_mask=mask,
                             position_ids=position).logits
    return float(token_cross_entropy_sum(logits, labels))


def _add(total: list[float], loss: float, tokens: int) -> None:
    total[0] += loss
    total[1] += tokens


def _shift(signal: torch.Tensor) -> torch.Tensor:
    """Position i gets the signal computed from h_{i-1}; position 0 none."""
    return F.pad(signal[:, :-1], (0, 0, 1, 0))


def _random_like(h: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(h.shape, generator=generator, dtype=h.dtype)


def diagnose_command(
    data: str,
    task: str,
    reasoner: str = "smollm2-135m",
    generator: str = "smollm2-135m",
    split: str = "test",
    limit: int = 8,
    lams: list[float] = [0.0, 0.1, 0.2, 0.5, 1.0],  # noqa: B006 - jsonargparse reads the default
    control_lam: float = 0.5,
    budgets: PromptBudgets = PromptBudgets(profile_tokens=192, query_tokens=96, target_tokens=128),  # noqa: B008
    batch_size: int = 4,
    seed: int = 0,
    out: str = "",
    checkpoint: str = "",
) -> None:
    """Measure, before training, why a reasoner's vectors disturb a generator (see docs/method.md).

    Prints the generator's target loss per token at each lambda and under the controls (random
    directions of the same norm, centred vectors, signal on target positions only, a random
    linear projection), and how concentrated the vectors are on the next token's embedding.

    Args:
        data: LongLaMP file or directory (any schema `flythinker run` reads; "sample" for the
            shipped review sample).
        task: product_review, abstract_generation or topic_writing.
        reasoner: Reasoner model: local dir, built-in alias or hub id.
        generator: Generator model, resolved the same way.
        split: Split whose records are measured.
        limit: Records measured (the first N of the split).
        lams: Lambdas of the published signal; 0 is SFT.
        control_lam: Lambda at which the controls are measured.
        budgets: Prompt and target token budgets, as in a run config.
        batch_size: Records per forward pass.
        seed: Seed of the random controls.
        out: Also write the result as JSON here.
        checkpoint: A trained FlyThinker checkpoint instead: report its target loss as trained
            and with the signal off (lambda 0, same weights), i.e. whether training made the
            generator use the signal. --reasoner/--generator/--lams are then not used.
    """
    from flythinker.data.longlamp import sample_data_path

    if limit < 1:
        raise FlyThinkerError(f"limit must be >= 1, got {limit}")
    source = sample_data_path() if data == "sample" else data
    records = list(load_longlamp(task, split, source=source, limit=limit))
    if not records:
        raise FlyThinkerError(f"{data}: split {split!r} has no records")
    if checkpoint:
        model = FlyThinker.from_pretrained(checkpoint, dtype="float32")
    else:
        model = FlyThinker.from_config(FlyThinkerConfig(reasoner=reasoner, generator=generator, lam=1.0,
                                                        fusion="pad", dtype="float32"))
    tokenizer = model.tokenizer
    assert tokenizer is not None
    examples = records_to_examples(records, tokenizer, "profile", budgets=budgets)
    encoded = [encode(tokenizer, e, budgets.prompt_tokens, budgets.target_tokens) for e in examples]
    pad = pad_id(tokenizer)
    batches = [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
    settings = {"data": data, "task": task, "split": split, "records": len(records), "budgets": budgets.__dict__}
    if checkpoint:
        result = signal_ablation(model, batches)
        result["settings"] = {**settings, "checkpoint": checkpoint}
        print(format_ablation(result))
    else:
        result = diagnose(model, batches, lams, control_lam, seed)
        result["settings"] = {**settings, "reasoner": reasoner, "generator": generator}
        print(format_diagnosis(result))
    if out:
        write_json(Path(out), result)
        print(f"written: {out}")


def format_diagnosis(result: dict[str, Any]) -> str:
    lines = ["| signal | target loss / token |", "| --- | --- |"]
    lines += [f"| {name} | {loss:.3f} |" for name, loss in result["target_loss"].items()]
    f = result["figures"]
    lines += [
        "",
        (f"reasoner vector norm {f['reasoner_vector_norm']:.2f} vs embedding norm {f['embedding_norm']:.3f}; "
         f"cosine of h_(i-1) with e_G(s_i) {f['cosine_with_next_token_embedding']:.3f}; "
         f"nearest embedding row to h_(i-1) is s_i at {100 * f['next_token_concentration']:.1f}% of "
         f"{f['positions']} positions"),
    ]
    return "\n".join(lines)


def format_ablation(result: dict[str, Any]) -> str:
    lines = ["| trained model | target loss / token |", "| --- | --- |"]
    lines += [f"| {name} | {loss:.4f} |" for name, loss in result["target_loss"].items()]
    lines += ["", (f"the signal lowers the loss by {result['signal_gain']:+.4f} nats/token; its norm "
                   f"{result['signal_norm']:.3f} vs embedding rows {result['embedding_norm']:.3f}")]
    return "\n".join(lines)
