"""Efficiency benchmark: every registered method in every mode it decodes, side by side.

The methods supply their entries and floors (`flythinker.methods.costs`): today SFT, FlyThinker in
each overlap mode, FlyThinker-shared, CoT and Coconut; the prompt-only baselines decode as SFT does.

Every method runs in one process, on the same weights (copies of one random or loaded generator),
through the same decode loop (`flythinker.model.decoding.decode`: same cache type, sampler, stopping
rule and per-step host sync), in the same weight format. On a GPU every method that can also
decodes with CUDA graphs (``steps="graph"``), and is then compared with SFT decoding with graphs;
likewise with compiled static steps (``"compiled"``, and ``"compiled-graph"`` on a GPU).
Decode repeats are interleaved across methods (repeat 1 of every method, then repeat 2, ...), so
drifting machine load hits all of them alike; each figure is the median over repeats, after a
warm-up run. Per-token latency is the median interval between consecutive tokens of a run; what
the first two decode steps cost beyond it is `decode_warmup_ms`, and the same on each entry's
first call (the warm-up: compilation and graph capture, which later calls of the same shape reuse)
is `first_call_warmup_ms`.

CoT and Coconut run the generator as they decode: CoT writes ``rationale_tokens`` tokens before its
first answer token (a fixed count: random weights cannot be trusted to write the answer marker),
Coconut feeds ``latent_thoughts`` hidden states back between its thought markers. Their time to
first token is to the first answer token.

Every result carries two ratios, both as costs relative to SFT (> 1 = costlier; for tokens/s,
SFT's throughput over this method's): the measured one, and the floor implied by the work:
- decode: bytes of weights read per step (a memory-bound step cannot beat reading them once):
  the generator's decoder and LM head, plus the reasoner's decoder (no LM head: its logits are never
  used), or plus only the adapter for the shared variant;
- time to first token: prefill FLOPs, 1 + non-embedding params of R / non-embedding params of G
  (CoT, Coconut: 1 + the tokens they add before answering / prompt tokens);
- training step: FLOPs, 1 + non-embedding params of R / params of G;
- peak memory: parameter bytes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import logging
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from flythinker.errors import FlyThinkerError
from flythinker.methods import METHODS
from flythinker.methods.costs import STEP_OPTIONS, BenchContext, BenchEntry, Floors, module_bytes
from flythinker.model.prepack import prepack_available, prepack_linears
from flythinker.model.sources import load_causal_lm, tiny_config
from flythinker.training.train import compiled_loss_sum, forward_loss_sum, make_optimizer

log = logging.getLogger(__name__)

# Architecture of the Qwen2.5 models (their published config.json), for random-weight runs that
# need no download. All three tie the LM head to the input embeddings.
_QWEN25 = {"vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "hidden_act": "silu", "num_key_value_heads": 2}
SHAPES: dict[str, dict[str, object]] = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16),
}
TINY = "tiny"

MEASURES = {  # measure -> (unit, higher is better)
    "ttft_ms": ("ms", False),
    "decode_ms_per_token_b1": ("ms", False),
    "decode_tokens_per_s_b8": ("tokens/s", True),
    "decode_tokens_per_s_b32": ("tokens/s", True),
    "train_step_s": ("s", False),
    "peak_memory_mb": ("MB", False),
    "decode_warmup_ms": ("ms", False),  # no ratio: near zero for eager decoding
    "first_call_warmup_ms": ("ms", False),  # no ratio: compilation and capture, paid once per shape
}
NO_RATIO = {"decode_warmup_ms", "first_call_warmup_ms"}


@dataclass
class BenchSettings:
    prompt_tokens: int = 32
    new_tokens: int = 16  # per batch-1 run (ttft and per-token latency)
    batch_new_tokens: int = 6  # per batch-8 / batch-32 run
    batch_prompt_tokens: int = 16
    batches: tuple[int, ...] = (8, 32)
    repeats: int = 5
    train_batch: int = 1
    train_tokens: int = 64
    train_repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    weights: str = "plain"  # "packed": oneDNN pre-packed linears for every method (CPU)
    generator: str = TINY
    reasoner: str = TINY
    threads: int = 1
    steps: tuple[str, ...] = ("dynamic",)  # also "graph", "compiled", "compiled-graph": every method that can
    rationale_tokens: int = 32  # CoT: tokens written before the answer
    latent_thoughts: int = 2  # Coconut: hidden states fed back before the answer
    lora_targets: tuple[str, ...] = ()  # FlyThinker-shared's adapted layers; empty: every linear layer
    ratio_convention: str = (
        "cost relative to SFT with the same step mode (dynamic, graph, compiled, compiled-graph) (>1 = costlier); "
        "for tokens/s: SFT's throughput / this one's"
    )
    peak_memory_definition: str = (
        "parameter and buffer bytes of the method's modules + the working memory of one batch-1 decode "
        "(GPU: max_memory_allocated over the allocation before it; CPU: peak RSS over the RSS before it)"
    )
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    method: str
    overlap: str | None
    measure: str
    value: float
    unit: str
    ratio_to_sft: float | None = None
    floor_ratio: float | None = None
    steps: str = "dynamic"  # the step mode (`STEP_OPTIONS`), compared with SFT's in the same mode


# ---------------------------------------------------------------------------------- models
def build_lm(source: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> PreTrainedModel:
    """A shape preset with random weights (no download), or a model by name or path."""
    if source in SHAPES or source == TINY:
        config = tiny_config() if source == TINY else Qwen2Config(**SHAPES[source])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                lm = Qwen2ForCausalLM(config)
        return lm.to(dtype).eval()
    return load_causal_lm(source, dtype=str(dtype).removeprefix("torch.")).to(device).eval()


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.warning("cannot reset the peak RSS here; CPU peak memory includes earlier phases")
    return _rss_bytes()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class DecodeTiming:
    ttft: float  # seconds from the call to the first (answer) token
    per_token: float  # median seconds between consecutive tokens
    warmup: float  # what the first two intervals cost beyond two median ones


def timed_decode(contender: BenchEntry, ids: torch.Tensor, new_tokens: int, device: torch.device) -> DecodeTiming:
    """Time one generate call, stamping every token as it is chosen."""
    stamps: list[float] = []

    def on_token(_: torch.Tensor) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    contender.run(ids, torch.ones_like(ids), new_tokens, on_token)
    if len(stamps) != new_tokens:
        raise FlyThinkerError(f"{contender.method} stopped after {len(stamps)} of {new_tokens} tokens")
    intervals = [b - a for a, b in itertools.pairwise(stamps)] or [0.0]
    per_token = statistics.median(intervals)
    return DecodeTiming(stamps[0] - start, per_token, max(0.0, sum(intervals[:2]) - per_token * len(intervals[:2])))


def random_prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device)


def train_step_seconds(model: nn.Module, settings: BenchSettings, vocab: int, device: torch.device,
                       extra_tokens: int = 0, compiled: bool = False) -> float:
    """Median seconds of one AdamW step (forward, backward, update), as `flythinker.training.train` runs it.

    ``extra_tokens``: longer sequences for the same examples (CoT trains on rationale + answer).
    ``compiled``: the forward and loss through torch.compile, as ``TrainConfig.compile`` runs them.
    """
    model.train()
    optimizer = make_optimizer(model, lr=1e-5, weight_decay=0.0)
    ids = random_prompts(settings.train_batch, settings.train_tokens + extra_tokens, vocab, device, seed=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_sum = compiled_loss_sum() if compiled else forward_loss_sum
    times = []
    for index in range(1 + settings.train_repeats):  # the first step allocates the optimizer state (and compiles)
        _sync(device)
        start = time.perf_counter()
        loss_sum(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- contenders
def _overlap_modes(device: torch.device) -> list[str]:
    modes = ["none"]
    if device.type == "cuda":
        modes.append("streams")
        if torch.cuda.device_count() > 1:
            modes.append("devices")
    return modes


# ---------------------------------------------------------------------------------- the run
Key = tuple[str, str | None, str]  # method, overlap, steps


def run_bench(settings: BenchSettings, overlaps: list[str] | None = None, seed: int = 0) -> list[Result]:
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    g = build_lm(settings.generator, dtype, device, seed=seed)
    r = g if settings.reasoner == settings.generator else build_lm(settings.reasoner, dtype, device, seed=seed + 1)
    vocab = g.config.vocab_size
    overlaps = overlaps or _overlap_modes(device)
    raw: dict[Key, dict[str, float]] = {}

    bench = BenchContext(
        generator=g, reasoner=r if r is not g else copy.deepcopy(g), device=device, steps=tuple(settings.steps),
        overlaps=tuple(overlaps), packed=settings.weights == "packed", prompt_tokens=settings.prompt_tokens,
        rationale_tokens=settings.rationale_tokens, latent_thoughts=settings.latent_thoughts,
        lora_targets=tuple(settings.lora_targets),
    )
    r = None  # the methods copy what they change; free this one

    # Training first, on fresh copies freed after each method: optimizer state is the largest memory.
    log.info("training steps")
    # Training does not depend on how a method decodes: the eager step is reported with the
    # dynamic rows, the compiled one (`TrainConfig.compile`) with the first compiled step mode's.
    compiled_mode = next((mode for mode in settings.steps if STEP_OPTIONS[mode].get("compile")), None)
    train_modes = {mode: mode == compiled_mode for mode in ("dynamic", compiled_mode) if mode in settings.steps}
    train_times: dict[tuple[str, str], float] = {}
    for trainer in (t for method in METHODS.values() for t in method.bench_trainers(bench)):
        # Weights, gradients and AdamW's two moments: four copies of every trained parameter.
        need = 4 * trainer.trained_bytes * 1.1
        if need > _available_bytes(device):
            settings.notes.append(f"{trainer.method}: training step skipped, needs about {need / 2**30:.1f} GiB")
            continue
        for mode, compiled in train_modes.items():
            model = trainer.build()
            train_times[(trainer.method, mode)] = train_step_seconds(
                model, settings, vocab, device, trainer.extra_tokens, compiled=compiled)
            # Each figure as it comes: a run cut off by a time limit still leaves these in its log.
            log.info("  %s (%s): %.3f s per training step", trainer.method, mode, train_times[(trainer.method, mode)])
            del model
            _free(device)

    floors = Floors(g)  # from the weights as loaded, before any packing
    contenders = [e for method in METHODS.values() for e in method.bench_entries(bench, floors)]
    if bench.packed:  # after the methods copied it: each packs its own copies for the rows it reads
        prepack_linears(g)
    bench.reasoner = None
    _free(device)
    for method in sorted({c.method for c in contenders} - {method for method, _ in train_times}):
        settings.notes.append(f"{method}: training step not timed (see its bench_trainers)")
    baseline = next(c for c in contenders if c.baseline)
    base_bytes = module_bytes(*baseline.modules)
    for c in contenders:
        timed = train_times.get((c.method, c.steps))
        raw[c.key] = {} if timed is None else {"train_step_s": timed}
        # Memory floor from the weights as they are held (a packed tied head is a second copy).
        c.floors["peak_memory_mb"] = module_bytes(*c.modules) / base_bytes

    # Peak memory: each contender's weights plus what one batch-1 decode adds. This is also its
    # first call, which compiles and captures what later calls of the same shape reuse.
    prompt = random_prompts(1, settings.prompt_tokens, vocab, device, seed)
    for c in contenders:
        _free(device)
        before = _reset_peak(device)
        first = timed_decode(c, prompt, settings.new_tokens, device)
        working = max(0, _peak(device) - before)
        raw[c.key]["peak_memory_mb"] = (module_bytes(*c.modules) + working) / 2**20
        raw[c.key]["first_call_warmup_ms"] = first.warmup * 1e3
        log.info("  %s: first call %.0f ms (compilation and capture included), %.1f ms/token",
                 "/".join(part for part in c.key if part), first.warmup * 1e3, first.per_token * 1e3)

    log.info("decode, batch 1")
    samples: dict[Key, dict[str, list[float]]] = {c.key: {} for c in contenders}
    for _ in range(settings.repeats):
        for c in contenders:
            timing = timed_decode(c, prompt, settings.new_tokens, device)
            samples[c.key].setdefault("ttft_ms", []).append(timing.ttft * 1e3)
            samples[c.key].setdefault("decode_ms_per_token_b1", []).append(timing.per_token * 1e3)
            samples[c.key].setdefault("decode_warmup_ms", []).append(timing.warmup * 1e3)
    for batch in settings.batches:
        log.info("decode, batch %d", batch)
        ids = random_prompts(batch, settings.batch_prompt_tokens, vocab, device, seed + batch)
        batched = [c for c in contenders if c.batched]
        for c in batched:  # warm-up: allocator and kernels at this batch size
            timed_decode(c, ids, 3, device)
        for _ in range(settings.repeats):
            for c in batched:
                timing = timed_decode(c, ids, settings.batch_new_tokens, device)
                samples[c.key].setdefault(f"decode_tokens_per_s_b{batch}", []).append(batch / timing.per_token)
    for key, measures in samples.items():
        raw[key].update({m: statistics.median(v) for m, v in measures.items()})
    return _with_ratios(raw, {c.key: c.floors for c in contenders}, baseline.method)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: try


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_ratios(raw: dict[Key, dict[str, float]], floors: dict[Key, dict[str, float]], baseline: str) -> list[Result]:
    results = []
    for (method, overlap, steps), values in raw.items():
        sft = raw.get((baseline, None, steps), {})
        for measure, value in values.items():
            unit, higher_is_better = MEASURES[measure]
            base = sft.get(measure)
            ratio = None
            if measure not in NO_RATIO and value and base:
                ratio = round(base / value if higher_is_better else value / base, 4)
            floor = floors[(method, overlap, steps)].get(measure)
            results.append(Result(method, overlap, measure, round(value, 4), unit, ratio,
                                  None if floor is None else round(floor, 4), steps))
    return results


# ---------------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _label(r: Result) -> str:
    label = r.method if r.overlap is None else f"{r.method}[{r.overlap}]"
    return label if r.steps == "dynamic" else f"{label}+{r.steps}"


def format_table(results: list[Result]) -> str:
    rows = [("method", "measure", "value", "unit", "x SFT", "floor")]
    rows += [(_label(r), r.measure, f"{r.value:.4g}", r.unit, "-" if r.ratio_to_sft is None else f"{r.ratio_to_sft:.3f}",
              "-" if r.floor_ratio is None else f"{r.floor_ratio:.3f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def plot_results(results: list[Result], path: Path) -> None:
    """One panel per measure: each method's cost ratio to SFT, with its floor as a tick mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [m for m in MEASURES if m not in NO_RATIO and any(r.measure == m for r in results)]
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.6), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        rows = [r for r in results if r.measure == measure]
        labels = [_label(r) for r in rows]
        ax.bar(range(len(rows)), [r.ratio_to_sft or 0 for r in rows], color="tab:blue", label="measured")
        ax.scatter(range(len(rows)), [r.floor_ratio or 0 for r in rows], color="black", marker="_", s=400, label="floor")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(measure, fontsize=8)
    axes[0][0].set_ylabel("cost relative to SFT")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_command(
    shape: str = TINY,
    reasoner_shape: str | None = None,
    generator: str | None = None,
    reasoner: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    weights: Literal["auto", "plain", "packed"] = "auto",
    overlaps: list[str] | None = None,
    steps: list[Literal["dynamic", "graph", "compiled", "compiled-graph"]] | None = None,
    batches: list[Literal[8, 32]] | None = None,
    prompt_tokens: int = 32,
    new_tokens: int = 16,
    batch_new_tokens: int = 6,
    repeats: int = 5,
    train_batch: int = 1,
    train_tokens: int = 64,
    rationale_tokens: int = 32,
    latent_thoughts: int = 2,
    lora_targets: list[str] | None = None,
    threads: int = 0,
    json: str | None = None,
    plot: str | None = None,
    seed: int = 0,
) -> None:
    """Time SFT, FlyThinker and FlyThinker-shared side by side, as ratios to SFT.

    Decode latency and throughput, a training step and peak memory, each as a ratio to SFT beside
    its floor from parameter bytes.

    Args:
        shape: Generator architecture with random weights: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b
            or tiny (no download). Ignored when ``generator`` is given.
        reasoner_shape: Reasoner architecture for FlyThinker (default: the generator's shape).
        generator: Generator by name or path (a checkpoint's ``generator/`` directory, an alias or
            a hub id) instead of a shape.
        reasoner: Reasoner by name or path (default: the generator again).
        device: "cpu", "cuda", "cuda:1", ...; "auto" takes the GPU when there is one.
        dtype: Weight dtype; "auto" is float32 on a CPU and bfloat16 on a GPU.
        weights: "packed" pre-packs every method's linear weights for oneDNN (CPU, fp32 only);
            "auto" packs where that is possible. Every method always gets the same format.
        overlaps: FlyThinker overlap modes to time (default: every mode this machine has).
        steps: Step modes: "dynamic" (growing caches), "graph" (static caches, CUDA-graph
            replay; CUDA only), "compiled" (static steps through torch.compile) and
            "compiled-graph" (both). Default: dynamic and graph on a GPU, dynamic on a CPU. Each
            method is compared with SFT decoding the same way.
        batches: Larger batches to time throughput at, besides batch 1 (default: 8 and 32; an
            empty list times batch 1 only, e.g. to keep compiled runs to one shape).
        prompt_tokens: Prompt length of the batch-1 runs (ttft and per-token latency).
        new_tokens: Tokens generated per batch-1 run.
        batch_new_tokens: Tokens generated per batch-8 and batch-32 run.
        repeats: Timed repeats of every decode measurement (after a warm-up); medians are reported.
        train_batch: Batch size of the timed training step.
        train_tokens: Sequence length of the timed training step.
        rationale_tokens: Tokens CoT writes before its answer (timed to its first answer token).
        latent_thoughts: Coconut's latent thoughts before its answer.
        lora_targets: FlyThinker-shared's adapted layers by name, e.g. [q_proj,v_proj] (default:
            every linear layer of the decoder blocks).
        threads: CPU threads for torch (0: torch's default). On a CPU shared with other jobs, 1
            avoids the stalls of oversubscribed thread pools.
        json: Write ``{"machine", "settings", "results"}`` here.
        plot: Write the bar chart here (default: beside ``json`` as .png, else bench.png).
        seed: Seed of the random weights and prompts.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads:
        torch.set_num_threads(threads)
    for name in (shape, reasoner_shape):
        if name is not None and generator is None and name not in SHAPES and name != TINY:
            raise FlyThinkerError(f"unknown shape {name!r}; choose one of {', '.join([*SHAPES, TINY])}")
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    packable = prepack_available(torch_device) and dtype == "float32"
    if weights == "packed" and not packable:
        raise FlyThinkerError("weights='packed' needs float32 weights on a CPU with oneDNN")
    resolved_weights = "packed" if weights == "packed" or (weights == "auto" and packable) else "plain"
    g_source = generator or shape
    steps = steps or (["dynamic", "graph"] if torch_device.type == "cuda" else ["dynamic"])
    for mode in steps:
        if STEP_OPTIONS[mode].get("cuda_graphs") and torch_device.type != "cuda":
            raise FlyThinkerError(f"step mode {mode!r} needs a CUDA device, not {torch_device}")
    settings = BenchSettings(
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_new_tokens=batch_new_tokens, repeats=repeats,
        train_batch=train_batch, train_tokens=train_tokens, device=str(torch_device), dtype=dtype,
        weights=resolved_weights, generator=g_source, reasoner=reasoner or reasoner_shape or g_source,
        threads=torch.get_num_threads(), steps=tuple(steps), rationale_tokens=rationale_tokens,
        latent_thoughts=latent_thoughts, lora_targets=tuple(lora_targets or ()),
        batches=BenchSettings.batches if batches is None else tuple(batches),
    )
    with _graph_failures_noted(settings):
        results = run_bench(settings, overlaps, seed)
    print(format_table(results))
    plot_path = Path(plot) if plot else Path(json).with_suffix(".png") if json else Path("bench.png")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_results(results, plot_path)
    print(f"chart: {plot_path}")
    if json:
        payload = {"machine": machine_info(torch_device), "settings": asdict(settings), "results": [asdict(r) for r in results]}
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(_json_dumps(payload))
        print(f"json: {json}")


@contextlib.contextmanager
def _graph_failures_noted(settings: BenchSettings):
    """A failed CUDA-graph capture falls back to eager steps; its "graph" rows must say so."""

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            note = f"CUDA graphs not used in some runs: {record.getMessage()}"
            if note not in settings.notes:
                settings.notes.append(note)

    handler, source = Collect(level=logging.WARNING), logging.getLogger("flythinker.model.graphs")
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)


def _json_dumps(value: object) -> str:
    return json.dumps(value, indent=2) + "\n"
