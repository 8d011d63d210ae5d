"""LongLaMP records from the hub or from local files, normalized to one typed record.

LongLaMP (``LongLaMP/LongLaMP`` on the Hugging Face hub) has three public tasks, each in a
``user`` and a ``temporal`` setting, with splits ``train``, ``val`` and ``test``. Every record
is one user's query, the text they wrote for it, and their profile of earlier writings:

- product_review: ``reviewerId, input, output, profile[{overall, summary, description, reviewText}]``
- abstract_generation: ``name, input, output, profile[{title, abstract, id, year}]``
- topic_writing: ``author, input, output, profile[{author, content, summary, id}]``
  (older copies spell topic profile items ``{input, output}``: input is the summary, output the
  content; both spellings are read)

Whatever the source, `load_longlamp` returns `LongLaMPRecord`s with typed profile items, or raises
`FlyThinkerError` naming the file, the record and the field at fault. With ``skip_invalid`` bad
records are counted and reported instead; a record is never dropped without a trace.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from flythinker.errors import FlyThinkerError

logger = logging.getLogger(__name__)

TASKS = ("product_review", "abstract_generation", "topic_writing")
SETTINGS = ("user", "temporal")
HUB_DATASET = "LongLaMP/LongLaMP"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
HUB_PROBE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ReviewItem:
    """One earlier product review of the user."""

    overall: float | None
    summary: str
    description: str
    review_text: str

    def rating_text(self) -> str:
        # LongLaMP formats the rating as the source stores it (a float: "5.0").
        return "" if self.overall is None else str(self.overall)

    def retrieval_text(self) -> str:
        """The document LongLaMP's retrievers index for this item."""
        return f"{self.rating_text()} {self.summary} {self.description} {self.review_text}"


@dataclass(frozen=True)
class AbstractItem:
    """One earlier paper of the author."""

    title: str
    abstract: str
    id: str | None = None
    year: int | None = None

    def retrieval_text(self) -> str:
        return f"{self.title} {self.abstract}"


@dataclass(frozen=True)
class TopicItem:
    """One earlier post of the user: its summary and its full text."""

    summary: str
    content: str
    id: str | None = None
    author: str | None = None

    def retrieval_text(self) -> str:
        return f"{self.summary} {self.content}"


ProfileItem = ReviewItem | AbstractItem | TopicItem


@dataclass(frozen=True)
class LongLaMPRecord:
    """One LongLaMP example, whatever file or hub config it came from.

    ``id`` is the record's own ``id`` field when it has one, else ``"{split}-{index}"`` with the
    0-based position in the split, so ids stay stable under ``limit``.
    """

    id: str
    task: str
    user_id: str
    query: str
    target: str
    profile: tuple[ProfileItem, ...]


@dataclass(frozen=True)
class SkippedRecord:
    location: str  # file and record index
    reason: str


@dataclass(frozen=True)
class LongLaMPSplit(Sequence[LongLaMPRecord]):
    """The records of one split, with where they came from and what was skipped."""

    task: str
    split: str
    source: str
    records: tuple[LongLaMPRecord, ...]
    skipped: tuple[SkippedRecord, ...] = field(default=())
    # The source is one list of records (a .jsonl or .parquet file, a JSON list), not named
    # splits: every split name reads these same records.
    unsplit: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[LongLaMPRecord]:
        return iter(self.records)

    def summary(self) -> str:
        line = f"{self.task}/{self.split} from {self.source}: {len(self.records)} records"
        if not self.skipped:
            return line
        reasons = "; ".join(f"{s.location}: {s.reason}" for s in self.skipped[:5])
        more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return f"{line}, {len(self.skipped)} invalid skipped: {reasons}{more}"


class InvalidRecord(FlyThinkerError):
    """A record that does not fit the LongLaMP schema; caught when skipping invalid records."""


# --------------------------------------------------------------------------- field checks


class _Fields:
    """Typed access to one raw record, raising errors that say where the bad value is."""

    def __init__(self, raw: object, location: str, prefix: str = "") -> None:
        if not isinstance(raw, Mapping):
            what = f"field {prefix.rstrip('.')!r}" if prefix else "the record"
            raise InvalidRecord(f"{location}: {what} must be an object, got {type(raw).__name__}")
        self.raw = raw
        self.location = location
        self.prefix = prefix

    def _fail(self, name: str, problem: str) -> InvalidRecord:
        return InvalidRecord(f"{self.location}: field {self.prefix + name!r} {problem}")

    def text(self, *names: str, required: bool = True, non_empty: bool = False) -> str:
        """The first present field among ``names`` (spelling alternatives), as a string."""
        for name in names:
            value = self.raw.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise self._fail(name, f"must be a string, got {type(value).__name__}")
            if non_empty and not value.strip():
                raise self._fail(name, "must be a non-empty string")
            return value
        if required:
            raise self._fail(" or ".join(names), "is missing")
        return ""

    def identifier(self, name: str, required: bool = True) -> str | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self._fail(name, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self._fail(name, f"must be a string or an integer, got {type(value).__name__}")
        return str(value)

    def number(self, name: str) -> float | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self._fail(name, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self._fail(name, f"must be a number, got {type(value).__name__}")
        return float(value)

    def year(self, name: str) -> int | None:
        value = self.number(name)
        return None if value is None else int(value)

    def items(self, name: str) -> list[object]:
        value = self.raw.get(name)
        if value is None:
            raise self._fail(name, "is missing")
        if not isinstance(value, list):
            raise self._fail(name, f"must be a list, got {type(value).__name__}")
        return value


def _review_item(f: _Fields) -> ReviewItem:
    return ReviewItem(
        overall=f.number("overall"),
        summary=f.text("summary", required=False),
        description=f.text("description", required=False),
        review_text=f.text("reviewText"),
    )


def _abstract_item(f: _Fields) -> AbstractItem:
    return AbstractItem(
        title=f.text("title"),
        abstract=f.text("abstract"),
        id=f.identifier("id", required=False),
        year=f.year("year"),
    )


def _topic_item(f: _Fields) -> TopicItem:
    return TopicItem(
        summary=f.text("summary", "input"),
        content=f.text("content", "output"),
        id=f.identifier("id", required=False),
        author=f.identifier("author", required=False),
    )


@dataclass(frozen=True)
class _Schema:
    user_field: str
    item: Callable[[_Fields], ProfileItem]


_SCHEMAS: dict[str, _Schema] = {
    "product_review": _Schema("reviewerId", _review_item),
    "abstract_generation": _Schema("name", _abstract_item),
    "topic_writing": _Schema("author", _topic_item),
}


def parse_record(task: str, raw: object, *, default_id: str, location: str) -> LongLaMPRecord:
    """Validate one raw LongLaMP record and normalize it; `InvalidRecord` says what is wrong."""
    schema = _SCHEMAS[task]
    f = _Fields(raw, location)
    profile = tuple(
        schema.item(_Fields(item, location, prefix=f"profile[{i}]."))
        for i, item in enumerate(f.items("profile"))
    )
    return LongLaMPRecord(
        id=f.identifier("id", required=False) or default_id,
        task=task,
        user_id=f.identifier(schema.user_field),  # type: ignore[arg-type]
        query=f.text("input", non_empty=True),
        target=f.text("output", non_empty=True),
        profile=profile,
    )


# The profile-item field that tells one task's items from another's.
TASK_BY_PROFILE_FIELD = {"reviewText": "product_review", "abstract": "abstract_generation", "content": "topic_writing"}


def task_of_profile(items: Sequence[object]) -> str | None:
    """The task whose profile items these are, told by the first item's fields (None: unknown)."""
    first = items[0] if items and isinstance(items[0], dict) else {}
    return next((task for key, task in TASK_BY_PROFILE_FIELD.items() if key in first), None)


def one_user_record(task: str, query: str, profile: object, *, record_id: str, location: str) -> LongLaMPRecord:
    """A record for one user from their profile items and a query, to write for (`flythinker
    write`, `flythinker serve`): validated like any record; its target is a placeholder."""
    raw = {"input": query, "output": "-", _SCHEMAS[task].user_field: "you", "profile": profile}
    return parse_record(task, raw, default_id=record_id, location=location)


# --------------------------------------------------------------------------- local files


@dataclass(frozen=True)
class _RawRecords:
    """Raw records of one file, each with the label errors use to point at it."""

    source: str
    rows: list[tuple[str, object]]  # (location, raw record)
    by_split: bool = True  # chosen by the split's name (a key or a file name), not the whole source


def _read_json(path: Path, split: str) -> tuple[list[object], bool]:
    """The records of ``split``, and whether the file names its splits (else all its records)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FlyThinkerError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None
    if isinstance(payload, list):
        return payload, False
    if isinstance(payload, dict) and payload and all(isinstance(v, list) for v in payload.values()):
        if split not in payload:
            raise FlyThinkerError(
                f"{path}: no split {split!r} in this file (it has {', '.join(sorted(payload))})"
            )
        return payload[split], True
    raise FlyThinkerError(
        f"{path}: expected a list of records or an object of splits such as "
        f'{{"train": [...], "test": [...]}}, got {type(payload).__name__}'
    )


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlyThinkerError(f"{path}: line {number}: malformed JSON ({exc.msg})") from None


def _read_parquet(path: Path) -> list[object]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FlyThinkerError(
            f"{path}: reading parquet needs pyarrow (pip install 'flythinker[hub]')"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowIOError and ArrowInvalid
        raise FlyThinkerError(f"{path}: cannot read parquet ({exc})") from None


def _read_file(path: Path, split: str) -> _RawRecords:
    try:
        if path.suffix == ".jsonl":
            rows = [(f"{path}: line {n}", raw) for n, raw in _read_jsonl(path)]
            return _RawRecords(str(path), rows, by_split=False)
        records, by_split = (_read_parquet(path), False) if path.suffix == ".parquet" else _read_json(path, split)
    except UnicodeDecodeError as exc:
        raise FlyThinkerError(
            f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    return _RawRecords(
        str(path), [(f"{path}: {split} record {i}", r) for i, r in enumerate(records)], by_split
    )


def _split_files(root: Path, split: str) -> list[Path]:
    """Files holding only ``split`` under ``root``: ``test.json``, ``test-00000-of-00001.parquet``,
    or any data file inside a ``test/`` folder (the layouts the hub's parquet export uses)."""
    found = [
        p
        for p in root.iterdir()
        if p.is_file()
        and p.suffix in FILE_SUFFIXES
        and (p.stem == split or p.stem.startswith((f"{split}-", f"{split}_")))
    ]
    folder = root / split
    if folder.is_dir():
        found += [p for p in folder.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES]
    return sorted(found)


def _directory_files(directory: Path, task: str, setting: str, split: str) -> tuple[list[Path], bool]:
    """The files to read for ``split``, and whether they were chosen by the split's name."""
    for root in (directory / f"{task}_{setting}", directory / task, directory):
        if not root.is_dir():
            continue
        files = _split_files(root, split)
        if files:
            return files, True
        for name in (f"{task}_{setting}", task):  # one file holding every split
            for suffix in (".json", ".jsonl", ".parquet"):
                if (root / f"{name}{suffix}").is_file():
                    return [root / f"{name}{suffix}"], False
    raise FlyThinkerError(
        f"{directory}: no {task} {split!r} data found; expected {split}.json/.jsonl/.parquet, "
        f"{split}-*.parquet or {task}.json with a {split!r} key, directly or in {task}_{setting}/"
    )


def _local_records(source: Path, task: str, setting: str, split: str) -> list[_RawRecords]:
    named = False
    if source.is_dir():
        files, named = _directory_files(source, task, setting, split)
    elif source.is_file():
        if source.suffix not in FILE_SUFFIXES:
            raise FlyThinkerError(f"{source}: unsupported file type; use .json, .jsonl or .parquet")
        files = [source]
    else:
        raise FlyThinkerError(f"{source}: no such file or directory")
    raws = [_read_file(path, split) for path in files]
    return [replace(raw, by_split=True) for raw in raws] if named else raws


# --------------------------------------------------------------------------- hub


def _hub_host() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or (
        443 if endpoint.scheme != "http" else 80
    )


def _hub_unreachable(detail: str) -> FlyThinkerError:
    return FlyThinkerError(
        f"could not reach the Hugging Face hub for {HUB_DATASET} ({detail}); download it where "
        "there is network and pass the local file or directory with --data PATH "
        "(or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache)"
    )


def _probe_hub() -> None:
    """Fail in seconds, not after the hub client's retries, when the hub is plainly unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return  # offline mode: `datasets` reads its cache and fails fast by itself
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy may reach what a direct connection cannot
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise _hub_unreachable(f"{host}:{port}: {exc}") from None


def _hub_records(task: str, setting: str, split: str, limit: int | None) -> list[_RawRecords]:
    try:
        import datasets
    except ImportError:
        raise FlyThinkerError(
            "loading LongLaMP from the hub needs the `datasets` package "
            "(pip install 'flythinker[hub]'), or pass a local copy with --data PATH"
        ) from None
    _probe_hub()
    config = f"{task}_{setting}"
    try:
        dataset = datasets.load_dataset(HUB_DATASET, config, split=split)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise _hub_unreachable(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # an unknown split or config
        raise FlyThinkerError(f"{HUB_DATASET} {config}: {exc}") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    source = f"hub:{HUB_DATASET}/{config}"
    return [
        _RawRecords(source, [(f"{source}: {split} record {i}", r) for i, r in enumerate(dataset)])
    ]


# --------------------------------------------------------------------------- entry point


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise FlyThinkerError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _parse_all(
    task: str, split: str, raws: list[_RawRecords], limit: int | None, skip_invalid: bool
) -> tuple[list[LongLaMPRecord], list[SkippedRecord]]:
    records: list[LongLaMPRecord] = []
    skipped: list[SkippedRecord] = []
    index = 0
    for raw in raws:
        for location, row in raw.rows:
            if limit is not None and index >= limit:
                return records, skipped
            try:
                records.append(
                    parse_record(task, row, default_id=f"{split}-{index}", location=location)
                )
            except InvalidRecord as exc:
                if not skip_invalid:
                    raise
                skipped.append(SkippedRecord(location, str(exc).removeprefix(f"{location}: ")))
            index += 1
    return records, skipped


def load_longlamp(
    task: str,
    split: str,
    source: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    setting: str = "user",
) -> LongLaMPSplit:
    """Load one LongLaMP split as normalized records.

    Args:
        task: ``product_review``, ``abstract_generation`` or ``topic_writing``.
        split: ``train``, ``val`` or ``test`` (any key a local split file has).
        source: a local ``.json``/``.jsonl``/``.parquet`` file or a directory of them; ``None``
            loads ``LongLaMP/LongLaMP`` from the hub (needs ``datasets``; cached by it).
        limit: keep only the first ``limit`` records of the split (invalid ones included in the
            count, so a limit selects the same records with or without ``skip_invalid``).
        skip_invalid: skip records that break the schema and report them in
            `LongLaMPSplit.skipped` (and a warning) instead of raising.
        setting: ``user`` or ``temporal`` (which hub config or ``{task}_{setting}/`` folder).

    Raises:
        FlyThinkerError: unknown task, unreadable or malformed file, an invalid record (naming
            file, record index and field) unless ``skip_invalid``, or an unreachable hub.
    """
    _check_choice("task", task, TASKS)
    _check_choice("setting", setting, SETTINGS)
    if limit is not None and limit < 1:
        raise FlyThinkerError(f"limit must be at least 1, got {limit}")
    if source is None:
        raws = _hub_records(task, setting, split, limit)
    else:
        raws = _local_records(Path(source).expanduser(), task, setting, split)
    records, skipped = _parse_all(task, split, raws, limit, skip_invalid)
    origin = ", ".join(dict.fromkeys(r.source for r in raws))
    unsplit = not all(raw.by_split for raw in raws)
    result = LongLaMPSplit(task, split, origin, tuple(records), tuple(skipped), unsplit)
    if skipped:
        logger.warning(result.summary())
    if not records:
        raise FlyThinkerError(f"{origin}: no valid {task} records in split {split!r}")
    return result


def sample_data_path() -> Path:
    """The shipped sample (see tools/make_sample_reviews.py): product_review schema, train/test."""
    from importlib import resources

    return Path(str(resources.files("flythinker") / "assets" / "sample_reviews.json"))
