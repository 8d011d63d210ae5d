"""Small file helpers that every writer shares: atomic directories, JSON, YAML, JSONL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from flythinker.errors import FlyThinkerError


class WriteFailed(FlyThinkerError, OSError):
    """An atomic write that failed (a full disk, say) and left the previous version in place.

    Both bad input to report in one line (`FlyThinkerError`) and still the `OSError` it was, for
    callers that handle I/O failures.
    """

    def __init__(self, target: Path, reason: str) -> None:
        super().__init__(f"cannot write {target}: {reason}; any earlier {target.name} is unchanged")
        self.reason = reason


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; it replaces ``path`` only if the block succeeds.

    A crash or kill inside the block leaves any previous ``path`` untouched (the temporary
    directory is a dot-file sibling, removed on errors and ignored by readers). An OS error while
    writing (a full disk, say) becomes a `FlyThinkerError` that says ``path`` is unchanged.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise FlyThinkerError(f"cannot write to {target.parent}: {exc.strerror}") from exc
    try:
        yield tmp
        _replace_dir(tmp, target)
    except (OSError, WriteFailed) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Nested atomic writes (a checkpoint holding a model that saves itself atomically) report
        # the outermost directory: the one the user asked for, not a temporary name.
        reason = exc.reason if isinstance(exc, WriteFailed) else exc.strerror or str(exc)
        raise WriteFailed(target, reason) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    # os.replace cannot swap a non-empty directory, so the old one steps aside first; it is only
    # deleted once the new one is in place.
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def to_plain(value: Any) -> Any:
    """Dataclasses (nested) to plain dicts, for JSON and YAML."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def write_yaml(path: Path, value: Any) -> None:
    replace_file(path, yaml.safe_dump(to_plain(value), sort_keys=False))


def write_json(path: Path, value: Any) -> None:
    # Atomic because the runner reads some of these files as markers (a row's train_stats.json
    # says it finished training): a torn one must never pass for a finished row.
    replace_file(path, json.dumps(to_plain(value), indent=2) + "\n")


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so readers see the old or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(path, exc.strerror or str(exc)) from exc


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
