"""The experiment runner: every method x task, trained, decoded, evaluated and reported in one go.

Layout of a run directory::

    run_config.yaml                  the resolved configuration
    <task>/<label>/checkpoint/       trained methods only (atomic; reused on rerun)
    <task>/<label>/settings.json     what decides this row's results; a rerun must match it
    <task>/<label>/train_stats.json  training time and samples (reused on rerun)
    <task>/<label>/predictions.jsonl one line per record, appended batch by batch
    <task>/<label>/predictions.part-<i>.jsonl  process i's rows under `accelerate launch`, until the
                                     main process gathers them into predictions.jsonl
    <task>/<label>/metrics.json      that method's metrics
    <task>/<label>/heldout_loss.json teacher-forced loss per evaluated record (validation_loss.json:
                                     the same on the validation split, when the task carves one)
    <task>/<label>/train_log.jsonl   one line per optimizer step (eval_log.jsonl: the validation
                                     loss every training.eval_every steps; best/: the weights
                                     of the lowest one, with training.keep_best, and
                                     heldout_loss_at_best.json their loss on the evaluated records)
    metrics.json, results.csv, results.md, plots/*.png
    paired.csv                       each method minus SFT on the same records, with 95% intervals

A rerun of the same command picks up where an interrupted one stopped: finished checkpoints are
loaded instead of retrained and ids already in ``predictions.jsonl`` are not decoded again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.longlamp import LongLaMPRecord, load_longlamp, sample_data_path
from flythinker.data.prompts import PromptBudgets
from flythinker.errors import FlyThinkerError
from flythinker.evaluation.metrics import evaluate_texts
from flythinker.io import to_plain, write_json, write_yaml
from flythinker.methods import METHODS, Method, MethodConfig, PredictionRow, RunContext, make_method
from flythinker.training.checkpoints import BEST_DIR, STATES_DIR, clear_states, load_best, read_best
from flythinker.training.engines import Processes, current_processes
from flythinker.training.train import EVAL_LOG_NAME, RESUMABLE_CHANGES, read_eval_log

PREDICTIONS = "predictions.jsonl"
PARTS_PREFIX = "predictions.part-"  # predictions.part-<process>.jsonl, while several processes decode
TRAIN_STATS = "train_stats.json"
SETTINGS = "settings.json"
HELDOUT_LOSS = "heldout_loss.json"
VALIDATION_LOSS = "validation_loss.json"
HELDOUT_LOSS_AT_BEST = "heldout_loss_at_best.json"


@dataclass
class TaskConfig:
    """One task's data.

    Attributes:
        task: product_review, abstract_generation or topic_writing.
        data: Local LongLaMP file or directory; "sample" is the small review set shipped with
            the package (synthetic users, written for this project); empty loads
            LongLaMP/LongLaMP from the hub.
        setting: user or temporal (hub config / directory layout).
        train_split: Split the trainable methods learn from.
        eval_split: Split every method is evaluated on (never train on test).
        train_limit: Use only the first N training records (0: all).
        eval_limit: Evaluate only the first N records (0: all).
        validation: Hold out the last N records of train_split as the split named "validation"
            (training then uses the rest). Choose settings there, never on test: either with
            ``eval_split: validation``, or, evaluating on test, by the validation loss every
            trained row then also reports (one training serves both the choice and the report).
    """

    task: str
    data: str = ""
    setting: str = "user"
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: int = 0
    eval_limit: int = 0
    validation: int = 0

    def __post_init__(self) -> None:
        if self.validation < 0:
            raise FlyThinkerError(f"{self.task}: validation must be >= 0, got {self.validation}")
        if self.eval_split == "validation" and not self.validation:
            raise FlyThinkerError(f"{self.task}: eval_split 'validation' needs validation: N > 0 (records held out of train)")
        if self.eval_split == self.train_split:
            raise FlyThinkerError(f"{self.task}: eval_split and train_split are both {self.train_split!r}; evaluate on held-out records")


@dataclass
class RunConfig:
    """A whole comparison.

    Attributes:
        out: Run directory.
        tasks: The tasks and their data.
        methods: The rows of the comparison (method name plus its settings).
        training: Optimisation settings, the same for every trainable method.
        generation: Decoding settings, the same for every method.
        budgets: Token budgets of the profile prompt form.
        decode_batch_size: Prompts decoded together.
        span_tokens: Width of the position-sensitive evaluation's spans, in whitespace tokens.
        dtype: Weight dtype of every model.
        seed: Seed of retrieval sampling and training.
        checkpoints_from: An earlier run directory whose trained rows this run decodes again
            instead of retraining them (for example the published sampling next to a greedy run).
            Each trained row must be finished there, with the same settings except generation;
            checkpoints are read in place, not copied.
    """

    out: str = "runs/experiment"
    tasks: list[TaskConfig] = field(default_factory=list)
    methods: list[MethodConfig] = field(default_factory=list)
    training: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    budgets: PromptBudgets = field(default_factory=PromptBudgets)
    decode_batch_size: int = 8
    span_tokens: int = 100
    dtype: str = "float32"
    seed: int = 0
    checkpoints_from: str = ""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise FlyThinkerError("the run config lists no tasks")
        if not self.methods:
            raise FlyThinkerError("the run config lists no methods")
        unknown = [m.method for m in self.methods if m.method not in METHODS]
        if unknown:
            raise FlyThinkerError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        labels = [m.name for m in self.methods]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise FlyThinkerError(f"method label(s) {', '.join(repeated)} used twice; set 'label' to tell them apart")
        if self.training.output_dir != TrainConfig().output_dir:
            raise FlyThinkerError(
                "training.output_dir is chosen by the runner (<out>/<task>/<method>); set the run's --out instead"
            )
        if self.decode_batch_size < 1:
            raise FlyThinkerError("decode_batch_size must be >= 1")
        if self.checkpoints_from and Path(self.checkpoints_from).resolve() == Path(self.out).resolve():
            raise FlyThinkerError("checkpoints_from is the run's own --out; name the earlier run's directory")


def run_experiment(config: RunConfig) -> dict[str, Any]:
    """Train, decode and evaluate every method on every task; write the report. Returns metrics."""
    from flythinker.evaluation.report import write_report

    out = Path(config.out)
    processes = current_processes()
    # Every row's settings are checked before anything is written: a refused rerun must leave the
    # directory, run_config.yaml included, describing the results it holds.
    for task in config.tasks:
        for method_config in config.methods:
            _check_settings(out / task.task / method_config.name, _settings(config, task, method_config))
            _trained_elsewhere(config, task, method_config)
    with processes.main_first():
        try:
            out.mkdir(parents=True, exist_ok=True)
            if processes.main:
                write_yaml(out / "run_config.yaml", config)
        except OSError as exc:
            raise FlyThinkerError(f"cannot write to run directory {out}: {exc.strerror}") from exc
    results: dict[str, Any] = {}
    for task in config.tasks:
        trains = _any_trainable(config)
        train_records = load_split(task, task.train_split, task.train_limit) if trains else []
        eval_records = load_split(task, task.eval_split, task.eval_limit, held_out=trains)
        validation_records = load_split(task, "validation", 0) if _reports_validation(task) else []
        for method_config in config.methods:
            _say(processes, f"== {task.task} / {method_config.name}")
            metrics = run_method(config, task, method_config, train_records, eval_records, validation_records, processes)
            if processes.main:
                results.setdefault(task.task, {})[method_config.name] = metrics
                # After every row, not once at the end: a long study stopped part way (a
                # session's end) still leaves tables of everything it finished.
                write_json(out / "metrics.json", results)
                write_report(results, out)
    return results


def run_method(
    config: RunConfig,
    task: TaskConfig,
    method_config: MethodConfig,
    train_records: Sequence[LongLaMPRecord],
    eval_records: Sequence[LongLaMPRecord],
    validation_records: Sequence[LongLaMPRecord] = (),
    processes: Processes = Processes(),  # noqa: B008 - immutable
) -> dict[str, Any] | None:
    """One row of the table: train (or reuse), predict what is missing, evaluate; for trained
    rows, the teacher-forced loss on the evaluated records and on ``validation_records``.

    Under `accelerate launch` every process runs this: training is distributed by the engine,
    the records still to decode are dealt out batch by batch, and the main process gathers the
    predictions and evaluates (it returns the metrics; the others None).
    """
    work = Path(config.out) / task.task / method_config.name
    with processes.main_first():
        work.mkdir(parents=True, exist_ok=True)
        if processes.main:
            _claim(work, _settings(config, task, method_config))
    context = RunContext(task=task.task, budgets=config.budgets, dtype=config.dtype, work_dir=work, seed=config.seed,
                         processes=processes)
    method = make_method(method_config, context)
    trained = _trained_elsewhere(config, task, method_config) or work  # where the row was trained
    train_stats = _train_or_reuse(method, config, train_records, trained, processes, validation_records)

    path = work / PREDICTIONS
    with processes.main_first():  # the main process repairs a torn last line before anyone reads
        done = read_predictions(work)
    todo = [r for r in eval_records if r.id not in done]
    if len(todo) < len(eval_records):
        _say(processes, f"   reusing {len(eval_records) - len(todo)} earlier prediction(s) in {work}; {len(todo)} to go")
    mine = _my_batches(todo, config.decode_batch_size, processes)
    # One process appends to predictions.jsonl as today; several each append to a part file of
    # their own, gathered below (a kill leaves every finished batch in some file).
    own = path if processes.count == 1 else work / f"{PARTS_PREFIX}{processes.index}.jsonl"
    processes.wait()  # everyone has read what was done before anyone writes
    if mine:
        for rows in method.predict(mine, config.generation, config.decode_batch_size):
            append_rows(own, rows)
            done.update({row.id: row for row in rows})
            _say(processes, f"   predicted {sum(r.id in done for r in eval_records)}/{len(eval_records)}"
                            + (f" (this process's share: {len(mine)})" if processes.count > 1 else ""))
    processes.wait()
    if not processes.main:
        processes.wait()  # until the main process has gathered and evaluated
        return None
    done = gather_predictions(work, eval_records, done)
    rows = [done[r.id] for r in eval_records]
    metrics = evaluate_texts([r.prediction for r in rows], [r.target for r in eval_records], config.span_tokens)
    metrics["per_sample"]["id"] = [r.id for r in eval_records]
    if method.trainable and method.heldout_comparable:
        metrics["heldout_loss"] = heldout_loss(method, config, eval_records, work)
        if validation_records:
            metrics["validation_loss"] = heldout_loss(method, config, validation_records, work, VALIDATION_LOSS)
        curve = validation_curve(trained / EVAL_LOG_NAME)
        if curve:
            metrics["validation_curve"] = curve
        if read_best(trained / BEST_DIR) is not None:  # last: it loads the kept weights into the model
            metrics["heldout_loss_at_best"] = heldout_loss_at_best(method, config, eval_records, work, trained)
    metrics["efficiency"] = efficiency(rows, train_stats)
    metrics["method"] = to_plain(method_config)
    write_json(work / "metrics.json", metrics)
    processes.wait()
    return metrics


def _say(processes: Processes, message: str) -> None:
    if processes.main:
        print(message, flush=True)


def _my_batches(todo: Sequence[LongLaMPRecord], batch_size: int, processes: Processes) -> list[LongLaMPRecord]:
    """This process's share of ``todo``: whole decode batches, dealt in turn, so every batch is
    the one a single process would decode and the predictions do not depend on the count."""
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return [r for batch in batches[processes.index :: processes.count] for r in batch]


def read_predictions(work: Path) -> dict[str, PredictionRow]:
    """Every prediction already in ``work``: predictions.jsonl and the part files of an earlier
    multi-process run that stopped before gathering them."""
    done = read_prediction_rows(work / PREDICTIONS)
    for part in sorted(work.glob(f"{PARTS_PREFIX}*.jsonl")):
        done.update(read_prediction_rows(part))
    return done


def gather_predictions(
    work: Path, records: Sequence[LongLaMPRecord], done: dict[str, PredictionRow]
) -> dict[str, PredictionRow]:
    """All rows of ``records`` into predictions.jsonl, in record order, once each; the part files
    are removed after it is in place (atomically), so a kill at any moment loses nothing.
    ``done``: this process's rows; the files are read again only when other processes wrote parts."""
    parts = sorted(work.glob(f"{PARTS_PREFIX}*.jsonl"))
    if parts:
        done = read_predictions(work)
    missing = [r.id for r in records if r.id not in done]
    if missing:
        raise FlyThinkerError(f"{work}: no prediction for {len(missing)} record(s), e.g. {missing[0]}")
    if parts:
        tmp = work / f".{PREDICTIONS}.tmp"
        tmp.unlink(missing_ok=True)
        append_rows(tmp, [done[r.id] for r in records])
        os.replace(tmp, work / PREDICTIONS)
        for part in parts:
            part.unlink()
    return done


def validation_curve(eval_log: Path) -> list[list[float]]:
    """``[[optimizer step, validation loss per target token], ...]`` from a row trained with
    ``training.eval_every`` (empty without one)."""
    return [[row["step"], row["loss"]] for row in read_eval_log(eval_log)]


def heldout_loss_at_best(
    method: Method, config: RunConfig, records: Sequence[LongLaMPRecord], work: Path, trained: Path
) -> dict[str, Any]:
    """`heldout_loss` of the weights kept at the row's lowest validation loss
    (``training.keep_best``, in ``trained``, the row's training directory: ``work`` unless
    `checkpoints_from` names another): early stopping chosen on validation, judged on the
    evaluated records. Loads those weights into the method's model (unless every record's loss is
    already saved in ``work``)."""
    best_dir = trained / BEST_DIR
    best = read_best(best_dir)
    saved = work / HELDOUT_LOSS_AT_BEST
    if not (saved.is_file() and {r.id for r in records} <= json.loads(saved.read_text()).keys()):
        load_best(method.model(), best_dir)
    return {**heldout_loss(method, config, records, work, HELDOUT_LOSS_AT_BEST),
            "step": best["step"], "validation_loss": best["loss"]}


def heldout_loss(
    method: Method, config: RunConfig, records: Sequence[LongLaMPRecord], work: Path, file: str = HELDOUT_LOSS
) -> dict[str, Any]:
    """Teacher-forced loss per target token on ``records`` (computed once, then read back from
    ``work/file``); per record too, for paired comparisons."""
    path = work / file
    saved = json.loads(path.read_text()) if path.is_file() else {}
    todo = [r for r in records if r.id not in saved]
    if todo:
        print(f"   {Path(file).stem.replace('_', ' ')} on {len(todo)} records", flush=True)
        saved.update({k: list(v) for k, v in method.target_losses(todo, config.training, config.decode_batch_size).items()})
        write_json(path, saved)
    pairs = [saved[r.id] for r in records]
    tokens = sum(n for _, n in pairs)
    return {"per_token": sum(loss for loss, _ in pairs) / max(tokens, 1), "tokens": tokens,
            "per_sample": {"id": [r.id for r in records], "loss_sum": [p[0] for p in pairs], "tokens": [p[1] for p in pairs]}}


def _settings(config: RunConfig, task: TaskConfig, method: MethodConfig) -> dict[str, Any]:
    """Everything that decides a row's checkpoint and predictions (not how many records are
    evaluated, nor batch sizes of decoding, which do not change a prediction)."""
    settings = to_plain({
        "method": method, "task": replace(task, eval_limit=0), "training": config.training,
        "generation": config.generation, "budgets": config.budgets, "dtype": config.dtype, "seed": config.seed,
    })
    for name in _NOT_DECIDING:
        settings["training"].pop(name)
    return settings


# Training settings that change how a run is watched, checkpointed or compiled, not what it
# produces, so a long study can start saving states midway: those training resumes with changed,
# less batch_size and grad_accum (only their product is free, which this flat comparison cannot
# say) and output_dir (always the default here: the runner chooses it).
_NOT_DECIDING = tuple(sorted(RESUMABLE_CHANGES - {"batch_size", "grad_accum", "output_dir"}))


def _check_settings(work: Path, settings: dict[str, Any]) -> None:
    """Reuse a directory's results only if they were made with the same settings."""
    changed = _changed_settings(work, settings)
    if changed:
        raise FlyThinkerError(
            f"{work} holds results made with other settings ({', '.join(changed)} changed); "
            "use another --out, or delete that directory to redo it"
        )


def _changed_settings(work: Path, settings: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """The top-level settings, other than ``ignore``, in which ``work``'s saved ones differ from
    ``settings`` (none if nothing is saved). A setting the code gained since (absent from the saved
    ones) matches if it is at its default, which is what those results were made with; so a long
    study survives a new option."""
    path = work / SETTINGS
    if not path.is_file():
        return []
    before = json.loads(path.read_text())
    for name in _NOT_DECIDING:  # saved by an older version that still recorded it
        before.get("training", {}).pop(name, None)
    defaults = _default_settings()
    return sorted(k for k in settings.keys() | before.keys()
                  if k not in ignore and not _same_settings(settings.get(k), before.get(k), defaults.get(k)))


def _trained_elsewhere(config: RunConfig, task: TaskConfig, method_config: MethodConfig) -> Path | None:
    """The row's directory in `RunConfig.checkpoints_from`, for a trained method (None without
    one): finished there and trained with this run's settings, generation aside, or an error."""
    if not config.checkpoints_from or not METHODS[method_config.method].trainable:
        return None
    source = Path(config.checkpoints_from) / task.task / method_config.name
    if not ((source / "checkpoint").is_dir() and (source / TRAIN_STATS).is_file()):
        raise FlyThinkerError(
            f"checkpoints_from: {source} holds no finished checkpoint of row {method_config.name!r}; "
            "finish that run first, or leave checkpoints_from empty to train here"
        )
    changed = _changed_settings(source, _settings(config, task, method_config), ignore=("generation",))
    if changed:
        raise FlyThinkerError(
            f"checkpoints_from: {source} was trained with other settings ({', '.join(changed)} changed); "
            "only generation settings may differ from the run that trained it"
        )
    return source


def _same_settings(now: Any, before: Any, default: Any) -> bool:
    if not (isinstance(now, dict) and isinstance(before, dict)):
        return now == before
    default = default if isinstance(default, dict) else {}
    for key in now.keys() | before.keys():
        if key not in before or key not in now:  # added or removed since: only at its default
            if (now if key in now else before)[key] != default.get(key, object()):
                return False
        elif not _same_settings(now[key], before[key], default.get(key)):
            return False
    return True


def _default_settings() -> dict[str, Any]:
    """`_settings`' shape with every field at its default (the method and task named "-")."""
    return to_plain({"method": MethodConfig(method="-"), "task": TaskConfig(task="-"), "training": TrainConfig(),
                     "generation": GenerationConfig(), "budgets": PromptBudgets()})


def _claim(work: Path, settings: dict[str, Any]) -> None:
    """Mark ``work`` as holding results of ``settings`` (checked again: the check is cheap)."""
    _check_settings(work, settings)
    if not (work / SETTINGS).is_file():
        write_json(work / SETTINGS, settings)


def _train_or_reuse(
    method: Method, config: RunConfig, records: Sequence[LongLaMPRecord], work: Path, processes: Processes = Processes(),  # noqa: B008
    validation_records: Sequence[LongLaMPRecord] = (),
) -> dict | None:
    checkpoint, stats_path = work / "checkpoint", work / TRAIN_STATS
    if not method.trainable:
        method.build()
        return None
    if checkpoint.is_dir() and stats_path.is_file():
        print(f"   reusing {checkpoint}")
        method.build(checkpoint)
        return json.loads(stats_path.read_text())
    if not records:
        raise FlyThinkerError(f"method {method.config.name!r} needs training records, and the train split is empty")
    method.build()
    training = replace(config.training, output_dir=str(work), seed=config.seed)
    if training.eval_every and not validation_records:
        raise FlyThinkerError(f"training.eval_every needs a validation split: set validation: N on task {work.parent.name!r}")
    result = method.train(records, training, run_config={"run": config, "method": method.config},
                          eval_records=validation_records)
    stats = {"train_s": result.seconds, "samples": result.samples, "steps": result.steps,
             "first_loss": result.losses[0], "last_loss": result.losses[-1]}
    with processes.main_first():  # written last: its presence marks the row trained
        if processes.main:
            write_json(stats_path, stats)
            # The row never resumes training again; its resumable states (optimizer moments
            # included, several times the model's size) would only fill the disk.
            clear_states(work / STATES_DIR)
    return stats


def efficiency(rows: Sequence[PredictionRow], train_stats: dict | None) -> dict[str, float | None]:
    """Training time per sample, decode latency per token step and time to first token."""
    batches = {(r.decode_s, r.batch_steps, r.batch_size) for r in rows}  # one entry per batch
    steps = sum(b[1] for b in batches)
    return {
        "train_s_per_sample": train_stats["train_s"] / train_stats["samples"] if train_stats else None,
        "decode_ms_per_token": 1000 * sum(b[0] for b in batches) / steps if steps else None,
        "ttft_ms": 1000 * sum(r.ttft_s for r in rows) / len(rows) if rows else None,
        "generated_tokens_mean": sum(r.generated_tokens for r in rows) / len(rows) if rows else None,
    }


def read_prediction_rows(path: Path) -> dict[str, PredictionRow]:
    """Rows already written; a torn last line (a kill mid-write) is dropped and rewritten later."""
    if not path.is_file():
        return {}
    rows: dict[str, PredictionRow] = {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            row = PredictionRow(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines) and not line.endswith("\n"):
                _truncate_last_line(path, len(line.encode("utf-8")))
                break
            raise FlyThinkerError(f"{path}:{number}: not a prediction row ({exc}); move the file away to redo it") from None
        rows[row.id] = row
    return rows


def _truncate_last_line(path: Path, size: int) -> None:
    with path.open("rb+") as f:
        f.truncate(path.stat().st_size - size)


def append_rows(path: Path, rows: Sequence[PredictionRow]) -> None:
    """Append and flush to disk, so a kill loses at most the batch being decoded."""
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(to_plain(row), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_split(task: TaskConfig, split: str, limit: int, *, held_out: bool = False) -> list[LongLaMPRecord]:
    """The records of ``split`` as the runner uses them (``validation`` carved from train, see
    `TaskConfig.validation`); the first ``limit`` (0: all). ``held_out``: they must not be the
    training records, which a source without named splits would give for every split name."""
    source = sample_data_path() if task.data == "sample" else task.data or None
    read = task.train_split if split == "validation" else split
    loaded = load_longlamp(task.task, read, source=source, limit=None if task.validation else limit or None,
                           setting=task.setting)
    if held_out and loaded.unsplit and split != "validation":
        raise FlyThinkerError(
            f"{task.task}: {loaded.source} is one list of records, not named splits, so "
            f"{task.train_split!r} and {split!r} would be the same records (training on the test "
            f"set); give a JSON file of splits ({{\"{task.train_split}\": [...], \"{split}\": [...]}}), "
            f"a directory with {task.train_split}.jsonl and {split}.jsonl, or evaluate on records "
            f"held out of it (validation: N with eval_split: validation)"
        )
    records = list(loaded)
    if task.validation:
        records = _carve(task, split, records)
        records = records[:limit] if limit else records
    if not records:
        raise FlyThinkerError(f"{task.task}: split {split!r} of {task.data or 'the hub'} is empty")
    return list(records)


def _carve(task: TaskConfig, split: str, records: list[LongLaMPRecord]) -> list[LongLaMPRecord]:
    """The validation split is the last ``task.validation`` records of the train split; the train
    split is the rest. Other splits are untouched."""
    if split not in ("validation", task.train_split):
        return records
    if task.validation >= len(records):
        raise FlyThinkerError(
            f"{task.task}: validation holds out {task.validation} records but {task.train_split!r} has "
            f"only {len(records)}; nothing would be left to train on"
        )
    return records[-task.validation :] if split == "validation" else records[: -task.validation]


def _reports_validation(task: TaskConfig) -> bool:
    """A task that carves a validation split and is evaluated elsewhere reports both losses."""
    return bool(task.validation) and task.eval_split != "validation"


def _any_trainable(config: RunConfig) -> bool:
    return any(METHODS[m.method].trainable for m in config.methods)


def run_command(
    tasks: list[TaskConfig],
    methods: list[MethodConfig],
    out: str = "runs/experiment",
    training: TrainConfig = TrainConfig(),  # noqa: B008 - jsonargparse reads defaults
    generation: GenerationConfig = GenerationConfig(),  # noqa: B008
    budgets: PromptBudgets = PromptBudgets(),  # noqa: B008
    decode_batch_size: int = 8,
    span_tokens: int = 100,
    dtype: str = "float32",
    seed: int = 0,
    checkpoints_from: str = "",
) -> None:
    """Run a comparison: train what needs training, decode, evaluate, write tables and plots.

    Usually driven by a YAML file: ``flythinker run --config configs/tiny.yaml [--out DIR]``;
    any field can be overridden on the command line after ``--config``. Rerunning the same
    command resumes an interrupted run.

    Args:
        tasks: The tasks and their data (see configs/*.yaml).
        methods: The rows of the comparison: method name and settings.
        out: Run directory.
        training: Optimisation settings, the same for every trainable method.
        generation: Decoding settings, the same for every method.
        budgets: Token budgets of the profile prompt form.
        decode_batch_size: Prompts decoded together.
        span_tokens: Span width of the position-sensitive evaluation, in whitespace tokens.
        dtype: Weight dtype of every model (float32, bfloat16, float16).
        seed: Seed of retrieval sampling and training.
        checkpoints_from: An earlier run directory whose trained rows are decoded again instead
            of retrained (same settings except generation; e.g. sampling next to greedy).
    """
    config = RunConfig(out=out, tasks=tasks, methods=methods, training=training, generation=generation,
                       budgets=budgets, decode_batch_size=decode_batch_size, span_tokens=span_tokens,
                       dtype=dtype, seed=seed, checkpoints_from=checkpoints_from)
    results = run_experiment(config)
    if results:  # the main process's; the others under `accelerate launch` return none
        print((Path(out) / "results.md").read_text(), end="")  # as written, paired intervals included
        print(f"\nresults: {Path(out) / 'results.md'}, {Path(out) / 'results.csv'}, plots in {Path(out) / 'plots'}")
