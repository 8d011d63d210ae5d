"""LongLaMP loading: every task and file layout, every malformed case, the offline hub path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LONGLAMP_FIXTURES as FIXTURES

from flythinker.data.longlamp import (
    AbstractItem,
    ReviewItem,
    TopicItem,
    load_longlamp,
)
from flythinker.errors import FlyThinkerError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_product_review_from_split_dict_file():
    data = load_longlamp("product_review", "test", FIXTURES / "product_review.json")
    assert [r.id for r in data] == ["test-0", "test-1"]
    first = data[0]
    assert first.user_id == "U2" and first.task == "product_review"
    assert first.target.startswith("The charger stopped")
    # Ratings arrive as int, float and numeric string; a null description reads as empty.
    assert first.profile[0] == ReviewItem(
        3.0, "Okay cable", "USB cable", "The cable works but it is short."
    )
    assert first.profile[1].overall == 4.5 and first.profile[1].description == ""
    assert data[1].profile == ()


def test_abstract_generation_from_jsonl():
    data = load_longlamp("abstract_generation", "test", FIXTURES / "abstract_generation.jsonl")
    assert len(data) == 3
    item = data[0].profile[1]
    assert item == AbstractItem("Streaming speech recognition", item.abstract, id="p2", year=2005)
    assert data[2].profile[0].year is None  # id and year are optional


def test_topic_writing_both_profile_spellings_from_a_directory():
    new = load_longlamp("topic_writing", "test", FIXTURES)
    old = load_longlamp("topic_writing", "train", FIXTURES)
    assert new[0].profile[0] == TopicItem(
        "Moving to a new city",
        "I moved to a new city for work. The first month was lonely.",
        "t1",
        "T1",
    )
    # The older spelling: input is the summary, output the content.
    assert old[0].profile[0] == TopicItem(
        "Starting a garden", "I planted tomatoes on my balcony. They need a lot of water."
    )
    assert new.source.endswith("topic_writing_user/test.jsonl")


def test_directory_with_task_file_and_limit():
    data = load_longlamp("product_review", "test", FIXTURES, limit=1)
    assert len(data) == 1 and data[0].id == "test-0"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        json.loads(line)
        for line in (FIXTURES / "abstract_generation.jsonl").read_text().splitlines()
    ]
    folder = tmp_path / "abstract_generation_user"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "test-00000-of-00001.parquet")
    data = load_longlamp("abstract_generation", "test", tmp_path)
    assert [r.user_id for r in data] == ["A1", "A2"]
    assert data[0].profile[0].title == "Robust dialogue systems"


@pytest.mark.skipif(
    not (SHARED / "abstract_generation.json").is_file(), reason="shared data absent"
)
def test_shared_real_slices():
    abstracts = load_longlamp("abstract_generation", "test", SHARED / "abstract_generation.json")
    reviews = load_longlamp("product_review", "train", SHARED)
    assert len(abstracts) == 40 and len(reviews) == 113
    assert all(len(r.profile) == 4 for r in abstracts)


# --------------------------------------------------------------------------- bad input


def _write_split(tmp_path: Path, records: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"test": records}))
    return path


def _abstract(**overrides) -> dict:
    record = {
        "name": "A",
        "input": 'Generate an abstract for the title "T"',
        "output": "An abstract.",
        "profile": [{"title": "P", "abstract": "Q."}],
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "record, message",
    [
        (_abstract(output=_DROP), "record 1: field 'output' is missing"),
        (_abstract(output=3), "record 1: field 'output' must be a string, got int"),
        (_abstract(profile="none"), "record 1: field 'profile' must be a list, got str"),
        (_abstract(profile=[{"title": "P"}]), "record 1: field 'profile[0].abstract' is missing"),
        (_abstract(profile=["x"]), "record 1: field 'profile[0]' must be an object, got str"),
        (_abstract(name=[1]), "record 1: field 'name' must be a string or an integer, got list"),
        ("not a record", "record 1: the record must be an object, got str"),
    ],
)
def test_invalid_record_names_file_record_and_field(tmp_path, record, message):
    path = _write_split(tmp_path, [_abstract(), record])
    with pytest.raises(FlyThinkerError) as err:
        load_longlamp("abstract_generation", "test", path)
    assert str(err.value) == f"{path}: test record 1: {message.split(': ', 1)[1]}"


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    path = _write_split(tmp_path, [_abstract(), _abstract(output=None), _abstract(profile={})])
    data = load_longlamp("abstract_generation", "test", path, skip_invalid=True)
    assert len(data) == 1 and data[0].id == "test-0"
    assert [s.location for s in data.skipped] == [
        f"{path}: test record 1",
        f"{path}: test record 2",
    ]
    assert "2 invalid skipped" in data.summary()
    assert "2 invalid skipped" in caplog.text


def test_every_record_invalid_is_an_error(tmp_path):
    path = _write_split(tmp_path, [_abstract(output=None)])
    with pytest.raises(FlyThinkerError, match="no valid abstract_generation records"):
        load_longlamp("abstract_generation", "test", path, skip_invalid=True)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"test": [ {"name": "A",, } ]}')
    with pytest.raises(FlyThinkerError, match=r"bad.json: malformed JSON at line 1 column"):
        load_longlamp("abstract_generation", "test", path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_abstract()) + "\n{oops\n")
    with pytest.raises(FlyThinkerError, match=r"bad.jsonl: line 2: malformed JSON"):
        load_longlamp("abstract_generation", "test", path)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_abstract(), _abstract(input="")]))
    with pytest.raises(
        FlyThinkerError, match=r"data.jsonl: line 2: field 'input' must be a non-empty"
    ):
        load_longlamp("abstract_generation", "test", path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "email_generation"}, "unknown task 'email_generation'"),
        ({"setting": "future"}, "unknown setting 'future'"),
        ({"split": "val"}, "no split 'val' in this file (it has test, train)"),
        ({"limit": 0}, "limit must be at least 1"),
        ({"source": "/nonexistent/data.json"}, "no such file or directory"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"task": "product_review", "split": "test", "source": FIXTURES / "product_review.json"}
    args.update(kwargs)
    with pytest.raises(FlyThinkerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_longlamp(**args)


def test_directory_without_the_split(tmp_path):
    with pytest.raises(FlyThinkerError, match="no abstract_generation 'test' data found"):
        load_longlamp("abstract_generation", "test", tmp_path)


# --------------------------------------------------------------------------- hub, offline


def _load_from_hub_in_subprocess(
    env_overrides: dict[str, str],
) -> tuple[subprocess.CompletedProcess, float]:
    code = (
        "from flythinker.data.longlamp import load_longlamp\n"
        "from flythinker.errors import FlyThinkerError\n"
        "try:\n"
        "    load_longlamp('abstract_generation', 'test')\n"
        "except FlyThinkerError as exc:\n"
        "    print(exc)\n"
    )
    import os

    env = {**os.environ, **env_overrides}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # No offline flag: an endpoint that refuses connections must still fail fast.
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
)
def test_hub_unreachable_fails_fast_and_points_at_data(env, tmp_path):
    pytest.importorskip("datasets")
    done, seconds = _load_from_hub_in_subprocess(
        {**env, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    )
    assert "could not reach the Hugging Face hub" in done.stdout, done.stdout + done.stderr
    assert "--data PATH" in done.stdout
    assert seconds < 30
