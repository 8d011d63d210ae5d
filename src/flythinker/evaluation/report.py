"""Tables and plots from a run's metrics: results.csv, results.md and plots/*.png.

Input is the ``metrics.json`` mapping ``{task: {label: metrics}}`` the runner writes; nothing here
knows one method from another except through the numbers, the saved method settings and the
registry's baseline.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

from flythinker.evaluation.stats import PairedDifference, paired_bootstrap
from flythinker.io import replace_file
from flythinker.methods import METHODS

QUALITY = ("rouge1", "rougeL", "meteor", "bleu")
EFFICIENCY = ("train_s_per_sample", "decode_ms_per_token", "ttft_ms")
LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR", "bleu": "BLEU"}
# The method every other row is compared with (SFT, as in the paper): the registry says which.
BASELINE = next(name for name, method in METHODS.items() if method.baseline)
PAIRED = ("rouge1", "rougeL", "meteor")  # per-record metrics; BLEU is corpus-level
# Held-out losses paired per record: of the final weights, and of those kept at the lowest
# validation loss (`TrainConfig.keep_best`: early stopping).
LOSSES = ("heldout_loss", "heldout_loss_at_best")
LOSS_NAMES = {"heldout_loss": "held-out loss", "heldout_loss_at_best": "held-out loss, best step",
              "validation_loss": "validation loss"}


def baseline_label(methods: dict[str, Any]) -> str | None:
    """The first row that runs the baseline method (found by method, whatever its label)."""
    return next((label for label, m in methods.items() if m.get("method", {}).get("method") == BASELINE), None)


def paired_rows(results: dict[str, dict[str, Any]], resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Each method minus SFT on the same records: metric differences and held-out loss per token,
    with paired-bootstrap 95% intervals. Rows are skipped where SFT's records differ."""
    rows = []
    for task, methods in results.items():
        base_label = baseline_label(methods)
        if base_label is None:
            continue
        base = methods[base_label]
        for label, m in methods.items():
            if label == base_label:
                continue
            ids = m.get("per_sample", {}).get("id")
            if ids is not None and ids == base.get("per_sample", {}).get("id"):
                for key in PAIRED:
                    d = paired_bootstrap(m["per_sample"][key], base["per_sample"][key], resamples=resamples, seed=seed)
                    rows.append(_paired_row(task, label, base_label, key, d, m["metrics"][key], base["metrics"][key]))
            for key in LOSSES:
                lm, lb = m.get(key), base.get(key)
                if lm and lb and lm["per_sample"]["id"] == lb["per_sample"]["id"]:
                    d = paired_bootstrap(lm["per_sample"]["loss_sum"], lb["per_sample"]["loss_sum"],
                                         lm["per_sample"]["tokens"], lb["per_sample"]["tokens"], resamples=resamples, seed=seed)
                    rows.append(_paired_row(task, label, base_label, key, d, lm["per_token"], lb["per_token"]))
    return rows


def _paired_row(task, label, base_label, metric, d: PairedDifference, value, base_value) -> dict[str, Any]:
    return {"task": task, "method": label, "baseline": base_label, "metric": metric, "value": value,
            "baseline_value": base_value, "difference": d.difference, "ci_low": d.low, "ci_high": d.high,
            "n": d.n, "interval": d.verdict}


def result_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per method x task: quality, then efficiency and its ratio to SFT."""
    rows = []
    for task, methods in results.items():
        base_label = baseline_label(methods)
        baseline = methods[base_label].get("efficiency", {}) if base_label else {}
        for label, m in methods.items():
            row: dict[str, Any] = {"method": label, "task": task}
            row.update({k: m["metrics"][k] for k in QUALITY})
            row.update({key: _loss(m, key) for key in ("heldout_loss", "validation_loss", "heldout_loss_at_best")})
            row.update(n=m["n_samples"], n_empty=m["n_empty_predictions"])
            for key in EFFICIENCY:
                value, base = m["efficiency"].get(key), baseline.get(key)
                row[key] = value
                row[f"{key}_ratio_to_sft"] = value / base if value is not None and base else None
            rows.append(row)
    return rows


def write_report(results: dict[str, dict[str, Any]], out: Path) -> None:
    """The run's tables, rewritten whole after every row (each file atomically), and its plots."""
    rows = result_rows(results)
    replace_file(out / "results.csv", _csv(rows))
    paired = paired_rows(results)
    if paired:
        replace_file(out / "paired.csv", _csv(paired))
    else:  # an earlier run's pairs would no longer describe these results
        (out / "paired.csv").unlink(missing_ok=True)
    replace_file(out / "results.md", format_results(results, paired) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_spans(results, plots / "spans.png")
    plot_efficiency(rows, plots / "efficiency.png")
    sweep = lambda_sweep(results)
    if sweep:
        plot_lambda_sweep(sweep, results, plots / "lambda_sweep.png")
    if any(m.get("validation_curve") for methods in results.values() for m in methods.values()):
        plot_validation_curves(results, plots / "validation_curves.png")


def format_results(results: dict[str, dict[str, Any]], paired: list[dict[str, Any]] | None = None) -> str:
    """The paper's layout: methods down, task x metric across; then each method against SFT on
    the same records (paired 95% intervals; ``paired`` as from `paired_rows`, computed when not
    given); then an efficiency table."""
    tasks = list(results)
    labels = list(dict.fromkeys(label for methods in results.values() for label in methods))
    # Only runs that carve a validation split (or keep best weights) get those columns.
    losses = ["heldout_loss"] + [key for key in ("validation_loss", "heldout_loss_at_best") if any(
        _loss(m, key) is not None for methods in results.values() for m in methods.values())]
    head = ["method"] + [f"{t} {name}" for t in tasks
                         for name in [*(LABELS[k] for k in QUALITY), *(LOSS_NAMES[k] for k in losses)]]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for label in labels:
        cells = [label]
        for task in tasks:
            m = results[task].get(label)
            cells += [_fmt(m["metrics"][k] if m else None, k) for k in QUALITY]
            cells += [_fmt(_loss(m, key), "loss") for key in losses]
        lines.append(_md_row(cells))
    paired = paired_rows(results) if paired is None else paired
    if paired:
        lines += ["", ("Against SFT on the same records (method minus SFT; paired bootstrap 95% interval over "
                       "records; for held-out loss per target token, lower is better):"), "",
                  _md_row(["task", "method", "metric", "method", "SFT", "difference", "95% interval"]),
                  _md_row(["---"] * 7)]
        for p in paired:
            kind = "loss" if p["metric"] in LOSSES else p["metric"]
            lines.append(_md_row([p["task"], p["method"], LABELS.get(p["metric"]) or LOSS_NAMES[p["metric"]],
                                  _fmt(p["value"], kind), _fmt(p["baseline_value"], kind), f"{p['difference']:+.4f}",
                                  f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"]))
    rows = result_rows(results)
    lines += ["", TIMING_CAVEAT, "",
              _md_row(["method", "task", "train s/sample", "x SFT", "decode ms/token", "x SFT", "TTFT ms", "x SFT"]),
              _md_row(["---"] * 8)]
    for r in rows:
        cells = [r["method"], r["task"]]
        for key in EFFICIENCY:
            cells += [_fmt(r[key], "time"), _fmt(r[f"{key}_ratio_to_sft"], "ratio")]
        lines.append(_md_row(cells))
    return "\n".join(lines)


# The runner times each method once, minutes apart, on whatever else the machine is doing: its
# ratios can be off by several-fold on a shared CPU. Said wherever they are shown.
TIMING_CAVEAT = ("Timings below: each method timed once, at a different moment, inside this run: indicative "
                 "only, not a speed comparison. For ratios measured side by side over repeats, with their "
                 "spread, use `flythinker bench`.")


def _loss(metrics: dict[str, Any] | None, key: str) -> float | None:
    return ((metrics or {}).get(key) or {}).get("per_token")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bleu":
        return f"{value:.2f}"
    if kind == "time":
        return f"{value:.3g}"
    if kind == "ratio":
        return f"{value:.2f}x"
    return f"{value:.4f}"


def plot_spans(results: dict[str, dict[str, Any]], path: Path, metric: str = "rougeL") -> None:
    """Position-sensitive analysis: quality of each 100-token span, per method and task."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items()):
        for label, m in methods.items():
            spans = [s for s in m["spans"] if s["n"]]
            ax.plot([f"{a}-{b}" for a, b in (s["tokens"] for s in spans)], [s[metric] for s in spans],
                    marker="o", label=label)
        ax.set(title=task, xlabel="output span (whitespace tokens)", ylabel=LABELS[metric])
        ax.tick_params(axis="x", labelrotation=30)
        if all(sum(1 for s in m["spans"] if s["n"]) <= 1 for m in methods.values()):
            ax.text(0.5, 0.5, "outputs shorter than one span:\nno position trend to show", transform=ax.transAxes,
                    ha="center", va="center", fontsize="small", color="gray")
    axes[0][-1].legend(fontsize="small")
    _save(fig, path)


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    """Training time per sample and decode latency per token, per method (first task's rows)."""
    first = [r for r in rows if r["task"] == rows[0]["task"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    for ax, key, title in zip(axes, EFFICIENCY, ("train s / sample", "decode ms / token", "time to first token, ms")):
        values = [r[key] or 0.0 for r in first]
        ax.bar([r["method"] for r in first], values)
        ax.set(title=f"{title} ({rows[0]['task']})")
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", fontsize="small")
    fig.suptitle("one timing per method, at different moments: indicative only (see `flythinker bench`)",
                 fontsize="small", color="gray")
    _save(fig, path)


def plot_validation_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Validation loss against optimizer steps, per task, for rows trained with eval_every:
    where a row's curve turns up, it has started to fit its training records more than the task."""
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items()):
        for label, m in methods.items():
            if m.get("validation_curve"):
                steps, losses = zip(*m["validation_curve"], strict=True)
                ax.plot(steps, losses, marker="o", markersize=3, label=label)
        ax.set(title=task, xlabel="optimizer step", ylabel="validation loss per target token")
        ax.legend(fontsize="small")
    _save(fig, path)


@dataclass(frozen=True)
class SweepLine:
    task: str
    label: str  # the first row's label, to tell several lines of one task apart
    points: list[tuple[float, float]]  # (lambda, ROUGE-L), by lambda


def lambda_sweep(results: dict[str, dict[str, Any]]) -> list[SweepLine]:
    """Rows that differ in lambda and nothing else, one line per such group with several lambdas:
    rows that also differ in fusion, gate or reasoner would make one line zig-zag between them."""
    lines = []
    for task, methods in results.items():
        groups: dict[str, list[tuple[str, float, float]]] = {}
        for label, m in methods.items():
            others = {k: v for k, v in m["method"].items() if k not in ("lam", "label")}
            groups.setdefault(json.dumps(others, sort_keys=True), []).append(
                (label, m["method"]["lam"], m["metrics"]["rougeL"]))
        for rows in groups.values():
            if len({lam for _, lam, _ in rows}) > 1:
                lines.append(SweepLine(task, rows[0][0], sorted((lam, score) for _, lam, score in rows)))
    return lines


def plot_lambda_sweep(sweep: list[SweepLine], results: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task in dict.fromkeys(line.task for line in sweep):
        lines = [line for line in sweep if line.task == task]
        for line in lines:
            name = task if len(lines) == 1 else f"{task}: {line.label}, ..."
            drawn = ax.plot([p[0] for p in line.points], [p[1] for p in line.points], marker="o", label=name)
        base = baseline_label(results[task])
        if base:
            ax.axhline(results[task][base]["metrics"]["rougeL"], linestyle="--", color=drawn[0].get_color(),
                       label=f"{base}, {task}")
    ax.set(xlabel="lambda", ylabel="ROUGE-L", title="lambda sweep")
    ax.legend(fontsize="small")
    _save(fig, path)


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
