"""`flythinker bench --shape tiny` runs end to end and writes the JSON schema of issue 7 and a PNG.

No timing is asserted: numbers on a shared test machine mean nothing; only the shape of the output.
"""

from __future__ import annotations

import json

import pytest
import torch

from flythinker.commands.bench import MEASURES, NO_RATIO
from flythinker.commands.cli import main

METHODS = {"sft", "flythinker", "flythinker-shared", "cot", "coconut"}
RESULT_KEYS = {"method", "overlap", "measure", "value", "unit", "ratio_to_sft", "floor_ratio", "steps"}
# CoT and Coconut decode like SFT once they answer: timed at batch 1, where their thinking shows.
THINKING_MEASURES = {"ttft_ms", "decode_ms_per_token_b1", "decode_warmup_ms", "first_call_warmup_ms", "peak_memory_mb"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_tiny_writes_json_and_png(tmp_path, restore_threads, capsys):
    out = tmp_path / "bench" / "out.json"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--json", str(out), "--repeats", "1",
            "--new_tokens", "3", "--batch_new_tokens", "2", "--train_tokens", "16", "--threads", "1",
            "--rationale_tokens", "3"]
    assert main(argv) == 0
    assert "decode_ms_per_token_b1" in capsys.readouterr().out

    payload = json.loads(out.read_text())
    assert set(payload) == {"machine", "settings", "results"}
    assert payload["settings"]["generator"] == "tiny" and payload["machine"]["torch"] == torch.__version__
    rows = payload["results"]
    assert all(set(r) == RESULT_KEYS and r["method"] in METHODS and r["measure"] in MEASURES for r in rows)
    assert {r["steps"] for r in rows} == {"dynamic"}  # no CUDA graphs on a CPU
    for method in ("sft", "flythinker", "flythinker-shared"):
        measured = {r["measure"] for r in rows if r["method"] == method}
        assert measured == set(MEASURES), method
    assert {r["measure"] for r in rows if r["method"] == "cot"} == THINKING_MEASURES | {"train_step_s"}
    assert {r["measure"] for r in rows if r["method"] == "coconut"} == THINKING_MEASURES
    for r in rows:
        assert r["unit"] == MEASURES[r["measure"]][0]
        if r["measure"] in NO_RATIO:
            assert r["value"] >= 0 and r["ratio_to_sft"] is None and r["floor_ratio"] is None
            continue
        assert r["value"] > 0 and r["floor_ratio"] >= 1.0
        if r["method"] == "sft":
            assert r["ratio_to_sft"] == 1.0 and r["floor_ratio"] == 1.0
    assert {r["overlap"] for r in rows if r["method"] == "flythinker"} == {"none"}
    # CoT's floor counts its 3 rationale tokens on top of the 32-token prompt.
    assert next(r["floor_ratio"] for r in rows if r["method"] == "cot" and r["measure"] == "ttft_ms") == round(1 + 3 / 32, 4)

    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_bench_times_compiled_steps_beside_sfts_at_batch_1_only(tmp_path, restore_threads):
    out = tmp_path / "compiled.json"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--json", str(out), "--repeats", "1", "--new_tokens", "3",
            "--train_tokens", "16", "--threads", "1", "--rationale_tokens", "3", "--steps", "[dynamic,compiled]",
            "--batches", "[]"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    compiled = {(r["method"], r["overlap"]) for r in rows if r["steps"] == "compiled"}
    # Coconut's latent passes have no static-cache path: it is timed with dynamic steps only.
    assert compiled == {("sft", None), ("flythinker", "none"), ("flythinker-shared", None), ("cot", None)}
    assert not any(r["measure"].startswith("decode_tokens_per_s") for r in rows)  # no larger batches
    # The training step is timed eagerly (dynamic rows) and compiled (`TrainConfig.compile`).
    trained = {(r["method"], r["steps"]) for r in rows if r["measure"] == "train_step_s"}
    assert trained == {(m, steps) for m in ("sft", "flythinker", "flythinker-shared", "cot") for steps in ("dynamic", "compiled")}
    assert all(r["ratio_to_sft"] == 1.0 for r in rows if r["method"] == "sft" and r["measure"] not in NO_RATIO)


def test_plain_weights_add_the_shared_variant_with_stacked_adapters_at_batch_1(tmp_path, restore_threads):
    out = tmp_path / "plain.json"
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--json", str(out), "--repeats", "1", "--new_tokens", "3",
            "--train_tokens", "16", "--threads", "1", "--rationale_tokens", "3", "--weights", "plain", "--batches", "[]"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    stacked = {r["measure"]: r for r in rows if r["method"] == "flythinker-shared-stacked"}
    shared = {r["measure"]: r for r in rows if r["method"] == "flythinker-shared"}
    assert set(stacked) == THINKING_MEASURES  # decoded at batch 1; it trains as the shared variant does
    assert stacked["decode_ms_per_token_b1"]["value"] > 0
    # The same weights, laid out differently: the shared variant's floors (memory: plus a few
    # zeros of bias under each stacked A).
    for measure in THINKING_MEASURES - NO_RATIO:
        assert stacked[measure]["floor_ratio"] == pytest.approx(shared[measure]["floor_ratio"], rel=1e-2), measure


def test_graphs_on_a_cpu_are_refused(capsys):
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--steps", "[graph]"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_unknown_shape_is_named(capsys):
    assert main(["bench", "--shape", "qwen9-huge"]) == 2
    assert "unknown shape 'qwen9-huge'" in capsys.readouterr().err


def test_the_bench_times_whatever_the_registry_supplies(tmp_path, restore_threads, monkeypatch):
    """No method list of its own: a newly registered method's entries are timed against the
    registry's baseline, and a method without a training step is noted, not silently skipped."""
    from dataclasses import replace

    from flythinker.methods import METHODS as REGISTRY
    from flythinker.methods.sft import SFT

    class Echo(SFT):  # decodes exactly as SFT: its ratios must come out near 1, its floors exactly 1
        name, baseline = "echo", False

        @classmethod
        def bench_entries(cls, bench, floors):
            return [replace(e, method=cls.name, baseline=False) for e in SFT.bench_entries(bench, floors)]

        @classmethod
        def bench_trainers(cls, bench):
            return []

    monkeypatch.setitem(REGISTRY, "echo", Echo)
    out = tmp_path / "out.json"
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--json", str(out), "--repeats", "1",
                 "--new_tokens", "3", "--batch_new_tokens", "2", "--train_tokens", "16", "--threads", "1",
                 "--rationale_tokens", "3"]) == 0
    payload = json.loads(out.read_text())
    echo = [r for r in payload["results"] if r["method"] == "echo"]
    assert {r["measure"] for r in echo} == set(MEASURES) - {"train_step_s"}
    assert all(r["floor_ratio"] == 1.0 for r in echo if r["measure"] not in NO_RATIO)
    assert any(note.startswith("echo: training step not timed") for note in payload["settings"]["notes"])
