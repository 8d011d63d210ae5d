"""Tables and plots from a run's metrics: results.csv, results.md and plots/*.png.

Input is the ``metrics.json`` mapping ``{task: {label: metrics}}`` the runner writes; nothing here
knows one method from another except through the numbers and the saved method settings.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

QUALITY = ("rouge1", "rougeL", "meteor", "bleu")
EFFICIENCY = ("train_s_per_sample", "decode_ms_per_token", "ttft_ms")
LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR", "bleu": "BLEU"}
BASELINE = "sft"  # efficiency ratios are to this row, as in the paper


def result_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per method x task: quality, then efficiency and its ratio to SFT."""
    rows = []
    for task, methods in results.items():
        baseline = methods.get(BASELINE, {}).get("efficiency", {})
        for label, m in methods.items():
            row: dict[str, Any] = {"method": label, "task": task}
            row.update({k: m["metrics"][k] for k in QUALITY})
            row.update(n=m["n_samples"], n_empty=m["n_empty_predictions"])
            for key in EFFICIENCY:
                value, base = m["efficiency"].get(key), baseline.get(key)
                row[key] = value
                row[f"{key}_ratio_to_sft"] = value / base if value is not None and base else None
            rows.append(row)
    return rows


def write_report(results: dict[str, dict[str, Any]], out: Path) -> None:
    rows = result_rows(results)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(format_results(results) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_spans(results, plots / "spans.png")
    plot_efficiency(rows, plots / "efficiency.png")
    sweep = lambda_sweep(results)
    if sweep:
        plot_lambda_sweep(sweep, results, plots / "lambda_sweep.png")


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """The paper's layout: methods down, task x metric across; then an efficiency table."""
    tasks = list(results)
    labels = list(dict.fromkeys(label for methods in results.values() for label in methods))
    head = ["method"] + [f"{t} {LABELS[k]}" for t in tasks for k in QUALITY]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for label in labels:
        cells = [label]
        for task in tasks:
            m = results[task].get(label)
            cells += [_fmt(m["metrics"][k] if m else None, k) for k in QUALITY]
        lines.append(_md_row(cells))
    rows = result_rows(results)
    lines += ["", _md_row(["method", "task", "train s/sample", "x SFT", "decode ms/token", "x SFT", "TTFT ms", "x SFT"]),
              _md_row(["---"] * 8)]
    for r in rows:
        cells = [r["method"], r["task"]]
        for key in EFFICIENCY:
            cells += [_fmt(r[key], "time"), _fmt(r[f"{key}_ratio_to_sft"], "ratio")]
        lines.append(_md_row(cells))
    return "\n".join(lines)


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
    axes[0][-1].legend(fontsize="small")
    _save(fig, path)


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    """Training time per sample and decode latency per token, per method (first task's rows)."""
    first = [r for r in rows if r["task"] == rows[0]["task"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, EFFICIENCY, ("train s / sample", "decode ms / token", "time to first token, ms")):
        values = [r[key] or 0.0 for r in first]
        ax.bar([r["method"] for r in first], values)
        ax.set(title=f"{title} ({rows[0]['task']})")
        ax.tick_params(axis="x", labelrotation=30)
    _save(fig, path)


def lambda_sweep(results: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per task, (lambda, ROUGE-L) of every FlyThinker row, when a run has more than one lambda."""
    sweep = {}
    for task, methods in results.items():
        points = sorted(
            (m["method"]["lam"], m["metrics"]["rougeL"])
            for m in methods.values() if m["method"]["method"] == "flythinker"
        )
        if len({lam for lam, _ in points}) > 1:
            sweep[task] = points
    return sweep


def plot_lambda_sweep(sweep: dict[str, list[tuple[float, float]]], results: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task, points in sweep.items():
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"FlyThinker, {task}")
        sft = results[task].get(BASELINE)
        if sft:
            ax.axhline(sft["metrics"]["rougeL"], linestyle="--", color=line[0].get_color(), label=f"SFT, {task}")
    ax.set(xlabel="lambda", ylabel="ROUGE-L", title="lambda sweep")
    ax.legend(fontsize="small")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
