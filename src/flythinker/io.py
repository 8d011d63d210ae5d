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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; it replaces ``path`` only if the block succeeds.

    A crash or kill inside the block leaves any previous ``path`` untouched (the temporary
    directory is a dot-file sibling, removed on errors and ignored by readers).
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
    path.write_text(yaml.safe_dump(to_plain(value), sort_keys=False))


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(to_plain(value), indent=2) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
