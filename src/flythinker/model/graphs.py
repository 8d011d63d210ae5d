"""Decode steps over fixed buffers, replayed from CUDA graphs.

At batch 1 an eager Hugging Face decode step on a GPU is bound by kernel launches, not by reading
the weights: on an H200 a Qwen2.5-3B step took 28.7 ms where reading its weights takes about 1.3 ms.
Two eager models per step pay that twice, whatever the streams. A CUDA graph records one step's
kernels once and replays them with one launch, which needs every tensor the step touches to stay
at one address:

- the KV caches are `transformers.StaticCache`s, which keep their write cursor on the device;
- the attention mask is a fixed (rows, max_length) table of attended cache slots (`SlotMask`),
  marked slot by slot inside the step and passed to the model as the 4-D additive mask, which
  transformers takes as is;
- the new tokens and positions are copied into fixed input buffers, and the step's outputs
  (logits, the next reasoning vector) come out in fixed output buffers.

The prompt prefill stays eager and dynamic (its shape differs from call to call); its caches are
then copied into static ones (`StaticState.cache`). Decoders use this module through `StaticStep`:
the first decode step runs eagerly (on a side stream, the warm-up capture needs), the second is
captured and replayed, and every later one is replayed. With ``capture=False`` the same buffers
and code run eagerly every step; that is what the CPU tests check against dynamic decoding, so a
graph replays a step already proven equal.

`compile_step` adds ``torch.compile`` on top: each decoder routes its static step (or, where two
CUDA streams split a step, each stream's half) through inductor, which fuses the step's many small
elementwise kernels. Static caches are what make this pay: every step has the same shapes, so one
compilation serves them all. Dynamo keeps compiled code per Python function, guarded by the input
shapes, so a later decode call with the same batch and cache length reuses it (no recompilation;
the tests count), whichever decoder object or model instance makes the call.

Between calls, `KEPT_STATES` keeps each model's static state (caches, input buffers, the captured
graph) for its last few shapes. A later call of the same shape refills those tensors in place
and replays the graph an earlier call captured: capture, and the allocations a fresh graph's
private memory pool would make, are paid once per shape rather than once per call. Static
caches are sized to a multiple of 256 slots (`reserved_length`) so that calls whose prompts
differ a little share a shape.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from transformers import DynamicCache, PretrainedConfig, StaticCache

from flythinker.errors import FlyThinkerError
from flythinker.model.prepack import PackedLinear

log = logging.getLogger(__name__)

STEP_MODES = ("dynamic", "static", "graph")
"""How a decoder runs its steps: growing caches, eager steps on static buffers, or CUDA graphs."""


def check_step_mode(mode: str, *devices: torch.device) -> None:
    if mode not in STEP_MODES:
        raise FlyThinkerError(f"step mode must be one of {', '.join(STEP_MODES)}, got {mode!r}")
    if mode == "graph" and any(device.type != "cuda" for device in devices):
        on = ", ".join(sorted({str(d) for d in devices}))
        raise FlyThinkerError(f"cuda_graphs needs the models on a CUDA device (they are on {on}); turn it off on a CPU")


def check_compile(devices: Sequence[torch.device], models: Sequence[torch.nn.Module] = ()) -> None:
    """Refuse ``torch.compile`` where inductor cannot build ``models``' code on ``devices``,
    before any work starts."""
    if any(device.type == "cpu" for device in devices) and not _cxx_compiler():
        raise FlyThinkerError(
            "compile on a CPU needs a C++ compiler for torch.compile's inductor backend (none found: set CXX "
            "or install g++); turn compile off"
        )
    # Inductor lowers oneDNN's packed linear only for weights it froze and packed itself.
    if any(isinstance(module, PackedLinear) for model in models for module in model.modules()):
        raise FlyThinkerError(
            "compile cannot run models whose linear weights were pre-packed for oneDNN (prepack_linears); "
            "compile the plain model, or decode the packed one without compile"
        )


def _cxx_compiler() -> str | None:
    named = os.environ.get("CXX")
    return shutil.which(named) if named else next(filter(None, map(shutil.which, ("g++", "clang++", "c++"))), None)


def compile_step(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``step`` (one decode step over static caches) compiled for fixed shapes.

    ``dynamic=False``: a decode step's shapes are its batch and cache length, both fixed for a
    whole call, so specialising costs one compilation per (batch, cache length) and buys the
    fastest kernels; `reserved_length` rounds cache lengths so that calls share them.
    """
    return torch.compile(step, dynamic=False)


STATIC_LENGTH_MULTIPLE = 256
"""Static caches hold a multiple of this many slots: calls whose prompt and token budget differ a
little then share one shape, hence one compiled step and one kept state; the extra slots stay
masked (at batch 1, 256 more masked slots cost far less than a recompilation or a capture)."""


def reserved_length(length: int, static: bool) -> int:
    """Cache slots to reserve for ``length`` tokens: rounded up for static caches."""
    if not static:
        return length
    return -(-length // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE


def fill_static_cache(cache: StaticCache, parts: Sequence[DynamicCache], max_length: int) -> StaticCache:
    """Empty ``cache`` (of ``max_length`` slots), then write ``parts``' prefill keys and values
    into it, rows stacked in order (slots ``[0, prompt_len)``; its cursor then points past them)."""
    cache.reset()  # zeroes a used cache's tensors and cursors; a fresh one has none yet
    for index, layers in enumerate(zip(*(part.layers for part in parts), strict=True)):
        keys = torch.cat([layer.keys for layer in layers])
        values = torch.cat([layer.values for layer in layers])
        if keys.shape[-2] >= max_length:
            raise FlyThinkerError(f"static cache of {max_length} slots cannot hold a {keys.shape[-2]}-token prompt and a step")
        cache.update(keys, values, index)
    return cache


class SlotMask:
    """Which cache slots each row attends to, on fixed buffers, for a cache filled one slot per step.

    Rows attend to their real prompt tokens (left padding stays masked) and to every slot a step
    has written since. `advance` marks the next slot and returns the additive (rows, 1, 1, slots)
    mask for that step; it runs inside the captured step, so its cursor lives on the device.
    """

    def __init__(self, prompt_mask: torch.Tensor, max_length: int, dtype: torch.dtype) -> None:
        rows = prompt_mask.shape[0]
        self.attend = torch.zeros(rows, max_length, dtype=torch.bool, device=prompt_mask.device)
        self.next_slot = torch.zeros(1, dtype=torch.long, device=prompt_mask.device)
        self.zeros = torch.zeros(rows, 1, 1, max_length, dtype=dtype, device=prompt_mask.device)
        self.blocked = torch.finfo(dtype).min
        self.reset(prompt_mask)

    def reset(self, prompt_mask: torch.Tensor) -> None:
        """Start over for a new prompt batch of the same rows, in place (a kept graph reads these)."""
        prompt_len = prompt_mask.shape[1]
        if prompt_mask.shape[0] != self.attend.shape[0] or prompt_len >= self.attend.shape[1]:
            raise FlyThinkerError(
                f"a slot mask of {tuple(self.attend.shape)} cannot take a prompt mask of {tuple(prompt_mask.shape)}"
            )
        self.attend.zero_()
        self.attend[:, :prompt_len] = prompt_mask.bool()
        self.next_slot.fill_(prompt_len)

    def advance(self) -> torch.Tensor:
        self.attend.index_fill_(1, self.next_slot, True)
        self.next_slot.add_(1)
        return self.zeros.masked_fill(~self.attend[:, None, None, :], self.blocked)


class StepInputs:
    """The fixed buffers a static step reads: the new tokens, their positions and the slot mask."""

    def __init__(self, prompt_mask: torch.Tensor, max_length: int, dtype: torch.dtype, rows: int | None = None) -> None:
        batch = prompt_mask.shape[0]
        device = prompt_mask.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # A decoder whose step batch stacks several roles per prompt (rows = k * batch) repeats the mask.
        repeats = (rows or batch) // batch
        self.mask = SlotMask(prompt_mask.repeat(repeats, 1), max_length, dtype)

    def reset(self, prompt_mask: torch.Tensor) -> None:
        repeats = self.mask.attend.shape[0] // prompt_mask.shape[0]
        self.mask.reset(prompt_mask.repeat(repeats, 1))

    def load(self, tokens: torch.Tensor, position: torch.Tensor) -> None:
        self.tokens.copy_(tokens)
        self.position.copy_(position)


class StaticStep:
    """Runs ``body`` (a step that reads and writes only fixed tensors) eagerly, or from a CUDA graph.

    With ``capture``: the first call runs ``body`` eagerly on a side stream (so lazily created
    state and cuBLAS workspaces exist before capture), the second captures and replays it, later
    calls replay. The returned tensor is a copy: the graph's output buffer is rewritten by every
    replay. If capture fails the step stays eager, with a warning saying why.
    """

    def __init__(self, body: Callable[[], torch.Tensor] | None, device: torch.device, capture: bool) -> None:
        # ``body`` is None while the step is kept between calls (`StaticState`): it is a method
        # of the decoder that made it, and would keep that decoder and its model alive.
        self.body, self.device, self.capture = body, device, capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.capture_error: str | None = None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.output.clone()
        if not self.capture or self.capture_error is not None:
            return self.body()
        if self.calls == 1:
            return self._warm_up()
        return self._capture_and_replay()

    def _warm_up(self) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            output = self.body()
        main.wait_stream(side)
        output.record_stream(main)  # made on the side stream, read on the main one
        return output

    def _capture_and_replay(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.body()
        except RuntimeError as exc:
            # Capture records kernels without running them, so the step's state is untouched:
            # run this step eagerly and stay eager.
            self.capture_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("CUDA graph capture failed, decoding eagerly on static caches: %s", self.capture_error)
            torch.cuda.synchronize(self.device)
            return self.body()
        self.graph, self.output = graph, output
        graph.replay()
        return output.clone()


class StaticState:
    """What a decoder's static steps read and write, kept from one decode call to the next.

    Decoders fill it through `cache`, `buffer` and `step_inputs`: on a new state these make the
    tensors; on a kept one they write this call's values into the tensors already there, so the
    graph an earlier call captured (``step``) replays over this call's prompt.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.caches: dict[str, StaticCache] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.inputs: StepInputs | None = None
        self.step: StaticStep | None = None
        self.uses = 0  # decode calls served, this one included

    def cache(self, name: str, config: PretrainedConfig, parts: Sequence[DynamicCache]) -> StaticCache:
        """The static cache ``name``, holding ``parts``' prefill."""
        if name not in self.caches:
            self.caches[name] = StaticCache(config=config, max_cache_len=self.max_length)
        return fill_static_cache(self.caches[name], parts, self.max_length)

    def buffer(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The buffer ``name``, holding a copy of ``value``."""
        kept = self.buffers.get(name)
        if kept is None:
            kept = self.buffers[name] = value.clone()
        elif kept.shape != value.shape or kept.dtype != value.dtype:
            raise FlyThinkerError(f"kept buffer {name!r} is {tuple(kept.shape)} {kept.dtype}, "
                                  f"this call's is {tuple(value.shape)} {value.dtype}")
        else:
            kept.copy_(value)
        return kept

    def step_inputs(self, prompt_mask: torch.Tensor, dtype: torch.dtype, rows: int | None = None) -> StepInputs:
        """The step's input buffers, reset for ``prompt_mask``'s prompts."""
        if self.inputs is None:
            self.inputs = StepInputs(prompt_mask, self.max_length, dtype, rows)
        else:
            self.inputs.reset(prompt_mask)
        return self.inputs


class StaticStates:
    """Static states kept per model for its most recently used shapes, at most ``per_model``.

    A state is taken out while a decode call uses it (two concurrent calls never share one) and
    put back when the call ends. Models are held weakly: a model's states go with it. States of a
    model whose weights have moved since (`weights_fingerprint`) can never serve again: the next
    state put back for that model drops them.
    """

    def __init__(self, per_model: int = 4) -> None:
        self.per_model = per_model
        self._kept: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[Hashable, StaticState]] = (
            weakref.WeakKeyDictionary()
        )
        self._weights: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def take(self, model: torch.nn.Module, key: Hashable) -> StaticState | None:
        with self._lock:
            state = self._kept.get(model, {}).pop(key, None)
            if state is None:
                self.misses += 1
            else:
                self.hits += 1
            return state

    def put(self, model: torch.nn.Module, key: Hashable, state: StaticState, weights: int) -> None:
        """Keep ``state`` under ``key`` for ``model``, whose weights have fingerprint ``weights``."""
        with self._lock:
            if self._weights.get(model) != weights:
                self._kept.pop(model, None)
                self._weights[model] = weights
            kept = self._kept.setdefault(model, OrderedDict())
            kept[key] = state
            kept.move_to_end(key)
            while len(kept) > self.per_model:
                kept.popitem(last=False)

    def kept(self, model: torch.nn.Module) -> int:
        """How many states ``model`` has kept."""
        with self._lock:
            return len(self._kept.get(model, ()))

    def forget(self, model: torch.nn.Module | None = None) -> None:
        """Drop ``model``'s kept states (every model's with None), freeing their memory."""
        with self._lock:
            if model is None:
                self._kept.clear()
                self._weights.clear()
            else:
                self._kept.pop(model, None)
                self._weights.pop(model, None)


KEPT_STATES = StaticStates()
"""The process's kept static states: `flythinker.model.decoding` takes and returns them;
``KEPT_STATES.forget(model)`` frees a model's."""


def weights_fingerprint(model: torch.nn.Module) -> int:
    """Where ``model``'s parameters and buffers live. A captured graph reads them at these
    addresses, so a state is reused only while they stay (values may change: training in place
    is fine; parameters replaced by new tensors are not)."""
    return hash(tuple(_address(t) for t in itertools.chain(model.parameters(), model.buffers())))


def _address(tensor: torch.Tensor) -> int:
    try:
        return tensor.data_ptr()
    except RuntimeError:  # opaque, e.g. oneDNN pre-packed weights (`flythinker.model.prepack`)
        return id(tensor)
