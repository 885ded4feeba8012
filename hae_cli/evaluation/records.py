"""The data `hae eval` scores, read into `Item`s: a JSONL or JSON file of records, the folder
`hae profile --samples` reads (`questions.json` beside its images), or a Hugging Face `datasets`
dataset saved with `save_to_disk`.

A record names its image (`image`) or images (`images`), relative to the file (the dataset's
folder for a `datasets` path column; an image column holds the pictures themselves), and asks a
`question`, or holds `turns` (`{"question", "answer"}` each) for `--task chat`. `answer` (or
`answers`: one or more references, or VQA's `[{"answer": ...}]`) is optional: without one the
answer is scored by its agreement with the full cache's. A `type` (per record, or per turn) is a
label the summary also groups scores by. With `choices` (a list of options) the
question is multiple choice and the answer is the right option's letter, text or 0-based
index. An `id` is optional (default: the record's number, from 0). Other key names are mapped
with `Columns` (the CLI's `--question-column`, ...).

A record that cannot be used (not JSON, no question, an image that is not there, ...) is a
`RecordProblem` saying where it is ("data.jsonl line 7: ..."): skipped with a note, or the
run refused (`strict`).

`hae profile` reads the same `questions.json` as a workload of `Prompt`s (`read_workload`):
an entry may be a multi-image story, and every problem refuses the run.

No torch at import: the CLI reads the data before the model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hae_cli.checks import kind_of, path_status, shown
from hae_cli.errors import InputError
from hae_cli.evaluation.metrics import LETTERS, choice_prompt, reference_letter
from hae_cli.user_text import checked_text

TASKS = ("ask", "story", "chat")
SAMPLES_FILE = "questions.json"  # the --samples folder's workload (`read_workload`, `read_data`)
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class Question:
    """One question and what scores its answer: references (text), or, with `choices`, the
    right option's letter; neither: agreement with the full cache."""

    text: str | None  # None: a story's default instruction
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    type: str | None = None  # the record's `type`: scores are also summed per type (e.g. the scene world's)

    @property
    def prompt(self) -> str | None:
        """What the model is asked: the question, with the options lettered for a multiple choice."""
        if self.choices and self.text is not None:
            return choice_prompt(self.text, self.choices)
        return self.text


@dataclass(frozen=True)
class Item:
    """One record, ready to run: its images (a file's path, or an image's encoded bytes), its
    questions (one; a conversation's in order) and where it came from, for messages."""

    id: str
    images: tuple[str | bytes, ...]
    questions: tuple[Question, ...]
    where: str
    image_names: tuple[str, ...] = ()  # as the record names them (a path as written; bytes by their hash)

    def to_json(self) -> dict:
        """What identifies the item in a fingerprint: the same wherever the data folder is."""
        return {"id": self.id, "images": list(self.image_names),
                "questions": [[q.text, list(q.answers), list(q.choices)] for q in self.questions]}


@dataclass(frozen=True)
class Columns:
    """The key (column) each field is read from; None: the default name(s)."""

    id: str | None = None
    image: str | None = None
    question: str | None = None
    answer: str | None = None
    choices: str | None = None
    turns: str | None = None

    DEFAULTS = {"id": ("id",), "image": ("image", "images"), "question": ("question",),
                "answer": ("answer", "answers"), "choices": ("choices",), "turns": ("turns",)}

    def names(self, what: str) -> tuple[str, ...]:
        given = getattr(self, what)
        return (given,) if given is not None else self.DEFAULTS[what]

    def given(self) -> dict[str, str]:
        """The fields mapped by flag: each must be a column of the data."""
        return {what: getattr(self, what) for what in self.DEFAULTS if getattr(self, what) is not None}


FLAGS = {"id": "--id-column", "image": "--image-column", "question": "--question-column",
         "answer": "--answer-column", "choices": "--choices-column", "turns": "--turns-column"}


class RecordProblem(Exception):
    """A record that cannot be used; the message says where and why."""


@dataclass
class Data:
    """What was read: the items in order, the records skipped (one line each), the source."""

    source: str
    items: list[Item]
    skipped: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        text = json.dumps([item.to_json() for item in self.items], sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_data(path: Path, task: str = "ask", columns: Columns = Columns(), split: str | None = None,
              strict: bool = False, limit: int | None = None) -> Data:
    """The items of `path` (a .jsonl / .json file, a --samples folder, a save_to_disk folder).
    A record that cannot be used is skipped and said in `skipped`; with `strict` it raises."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r} (use {', '.join(TASKS)})")
    status = path_status(path, "data")
    if status is None:
        raise InputError(f"data not found: {shown(path)}")
    kind = kind_of(status)
    if kind == "folder":
        if path_status(path / SAMPLES_FILE, "data") is not None:
            source, rows, base = path / SAMPLES_FILE, _json_records(path / SAMPLES_FILE), path
        elif any(path_status(path / marker, "data") is not None for marker in DATASET_MARKERS):
            source, rows, base = path, _dataset_records(path, columns, split), path
            split = None  # taken
        else:
            raise InputError(f"{shown(path)} is a folder without {SAMPLES_FILE} and is no saved dataset "
                             "(save_to_disk); give a .jsonl or .json file, or such a folder")
    elif kind != "file":
        raise InputError(f"data {shown(path)} is a {kind}; give a .jsonl or .json file, or a folder")
    elif path.suffix.lower() == ".jsonl":
        source, rows, base = path, _jsonl_records(path), path.parent
    elif path.suffix.lower() == ".json":
        source, rows, base = path, _json_records(path), path.parent
    else:
        raise InputError(f"data {shown(path)}: give a .jsonl or .json file of records, a folder with "
                         f"{SAMPLES_FILE}, or a folder written by datasets' save_to_disk")
    if split is not None:
        raise InputError(f"--split chooses a split of a saved dataset; {shown(source)} is not one")
    data = Data(str(source), [])
    seen: dict[str, str] = {}
    keys_seen: set[str] = set()
    for number, where, raw in rows:
        if limit is not None and len(data.items) >= limit:
            break  # the first `limit` usable records; what lies after them is not read
        try:
            if isinstance(raw, RecordProblem):
                raise raw
            if isinstance(raw, dict):
                keys_seen.update(raw)
            item = parse_record(raw, number, where, base, task, columns)
            if item.id in seen:
                raise RecordProblem(f"{where}: id {item.id!r} is also {seen[item.id]}'s")
            if strict:
                _images_open(item)
        except RecordProblem as problem:
            if strict:
                raise InputError(f"{problem} (drop --strict to skip such records)") from None
            data.skipped.append(str(problem))
            continue
        seen[item.id] = where
        data.items.append(item)
    _check_columns(columns, keys_seen, source)
    if not data.items:
        why = f": {data.skipped[0]}" + (f" (and {len(data.skipped) - 1} more)" if len(data.skipped) > 1 else "") \
            if data.skipped else ""
        raise InputError(f"no usable records in {shown(source)}{why}")
    return data


def _check_columns(columns: Columns, keys: set[str], source) -> None:
    for what, name in columns.given().items():
        if name not in keys:
            names = ", ".join(sorted(keys)) or "none"
            raise InputError(f"{FLAGS[what]} {name!r} is not a column of {shown(source)} (its columns: {names})")


# --------------------------------------------------------------------------- hae profile's workload


@dataclass(frozen=True)
class Prompt:
    """One prompt of a `hae profile` workload."""

    task: str  # "ask" or "story"
    images: tuple[Path, ...]
    question: str | None
    answer: str | None = None  # expected answer, when the workload knows it

    def label(self) -> str:
        return ", ".join(p.name for p in self.images)

    def to_json(self) -> dict:
        return {"task": self.task, "images": [str(p) for p in self.images], "question": self.question, "answer": self.answer}


def sample_folder() -> Path:
    """`sample_images/` in the working directory, else the one beside the package."""
    for candidate in (Path.cwd() / "sample_images", Path(__file__).resolve().parents[2] / "sample_images"):
        if candidate.is_dir():
            return candidate
    raise InputError("no sample_images/ folder found; pass --images and --question (or --samples DIR)")


def read_workload(folder: Path) -> list[Prompt]:
    """`questions.json` in `folder` as `hae profile` runs it: a list of {"image", "question",
    "answer"?} (image names relative to the folder), or {"images": [...], "task": "story"} for a
    multi-image prompt. Any bad entry refuses the whole workload."""
    path = folder / SAMPLES_FILE
    if not path.is_file():
        raise InputError(f"no {SAMPLES_FILE} in {folder}; pass --images and --question")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of {{\"image\", \"question\"}} entries")
    prompts = []
    for number, entry in enumerate(entries, start=1):
        images = entry.get("images", [entry.get("image")]) if isinstance(entry, dict) else None
        task = entry.get("task", "ask") if isinstance(entry, dict) else None
        question = entry.get("question") if isinstance(entry, dict) else None
        if not images or not all(isinstance(i, str) for i in images) or task not in ("ask", "story"):
            raise InputError(f"{path}: entry {number} needs an image (or images) and task ask or story")
        if task == "ask" and question is None:
            raise InputError(f"{path}: entry {number} has no question")
        if question is not None:
            checked_text(question, f"{path}: entry {number} question")
        answer = entry.get("answer")
        if answer is not None:
            checked_text(answer, f"{path}: entry {number} answer")
        prompts.append(Prompt(task, tuple(folder / i for i in images), question, answer))
    if not prompts:
        raise InputError(f"{path} holds no entries")
    return prompts


# --------------------------------------------------------------------------- one record


def parse_record(raw: object, number: int, where: str, base: Path, task: str, columns: Columns) -> Item:
    """A record (a dict) as an `Item`, or `RecordProblem`."""
    if not isinstance(raw, dict):
        raise RecordProblem(f"{where}: a record must be a JSON object, got {_kind(raw)}")
    record_task = raw.get("task")
    if record_task is not None and record_task != task:
        raise RecordProblem(f"{where}: a {record_task!r} record (run it with --task {record_task})")
    item_id = _value(raw, columns, "id")
    if item_id is None:
        item_id = str(number)
    elif isinstance(item_id, (str, int)) and not isinstance(item_id, bool):
        item_id = str(item_id)
    else:
        raise RecordProblem(f"{where}: id must be text or a number, got {_kind(item_id)}")
    images, names = _images(raw, columns, where, base)
    turns = _value(raw, columns, "turns")
    if turns is not None:
        if task != "chat":
            raise RecordProblem(f"{where}: a conversation (turns) needs --task chat")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise RecordProblem(f"{where}: turns must be a list of {{\"question\", \"answer\"}} objects")
        questions = tuple(_question(turn, Columns(), f"{where} turn {k}", task)
                          for k, turn in enumerate(turns, start=1))
    else:
        questions = (_question(raw, columns, where, task),)
    return Item(item_id, images, questions, where, names)


def _question(raw: dict, columns: Columns, where: str, task: str) -> Question:
    question = _untyped_question(raw, columns, where, task)
    kind = raw.get("type")
    if kind is None:
        return question
    if not isinstance(kind, str) or not kind.strip():
        raise RecordProblem(f"{where}: type must be text (a label to group scores by), got {_kind(kind)}")
    return dataclasses.replace(question, type=kind.strip())


def _untyped_question(raw: dict, columns: Columns, where: str, task: str) -> Question:
    text = _value(raw, columns, "question")
    if text is None and task != "story":
        raise RecordProblem(f"{where}: no question" + (f" ({columns.question!r})" if columns.question else ""))
    if text is not None:
        text = _text(text, f"{where}: the question")
    answers = _answers(_value(raw, columns, "answer"), where)
    choices = _value(raw, columns, "choices")
    if choices is None:
        return Question(text, answers)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, str) for c in choices):
        raise RecordProblem(f"{where}: choices must be a list of 2 to {len(LETTERS)} options (text)")
    choices = tuple(_text(c, f"{where}: choice {k}") for k, c in enumerate(choices, start=1))
    raw_answer = _value(raw, columns, "answer")
    if raw_answer is None:
        return Question(text, (), choices)
    letter = reference_letter(raw_answer[0] if isinstance(raw_answer, list) and raw_answer else raw_answer, choices)
    if letter is None:
        raise RecordProblem(f"{where}: the answer {raw_answer!r} is none of the choices (give a letter, "
                            "the option's text or its 0-based index)")
    return Question(text, (letter,), choices)


def _answers(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    answers = []
    for entry in values:
        if isinstance(entry, dict) and "answer" in entry:  # VQA's [{"answer": ..., "answer_confidence": ...}]
            entry = entry["answer"]
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = str(entry)
        if not isinstance(entry, str):
            raise RecordProblem(f"{where}: an answer must be text, got {_kind(entry)}")
        answers.append(_text(entry, f"{where}: the answer"))
    return tuple(answers)


def _images(raw: dict, columns: Columns, where: str, base: Path) -> tuple[tuple[str | bytes, ...], tuple[str, ...]]:
    """The record's images (a file's resolved path, or an image's bytes) and their names."""
    value = _value(raw, columns, "image")
    if value is None:
        raise RecordProblem(f"{where}: no image (\"image\": a path, or \"images\": a list of paths)")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise RecordProblem(f"{where}: no image (the list of images is empty)")
    images: list[str | bytes] = []
    names: list[str] = []
    for entry in values:
        if isinstance(entry, dict):  # a datasets Image cell, read as stored: {"bytes", "path"}
            if entry.get("bytes"):
                images.append(bytes(entry["bytes"]))
                names.append("sha256:" + hashlib.sha256(images[-1]).hexdigest())
                continue
            entry = entry.get("path")
        if not isinstance(entry, str) or not entry.strip():
            raise RecordProblem(f"{where}: an image must be a path (text), got {_kind(entry)}")
        images.append(_image_file(base / entry, entry, where))
        names.append(entry)
    return tuple(images), tuple(names)


def _image_file(path: Path, written: str, where: str) -> str:
    try:
        status = path_status(path, "image")
    except InputError as error:
        raise RecordProblem(f"{where}: {error}") from None
    if status is None:
        raise RecordProblem(f"{where}: image not found: {shown(written)} (looked for {shown(path)})")
    if kind_of(status) != "file":
        raise RecordProblem(f"{where}: image {shown(written)} is a {kind_of(status)}, not a file")
    return str(path.resolve())


def _images_open(item: Item) -> None:
    """Every image of the record decodes (hae's one image loader): what --strict promises before
    anything runs, so that a truncated file is not an item that fails an hour in."""
    from hae_cli.evaluation.runner import _picture
    from hae_cli.model.image_file import load_image

    for source in item.images:
        try:
            load_image(_picture(source, item.where))
        except InputError as error:
            raise RecordProblem(f"{item.where}: {error}") from None


def _value(raw: dict, columns: Columns, what: str):
    for name in columns.names(what):
        if name in raw and raw[name] is not None:
            return raw[name]
    return None


def _text(value: object, what: str) -> str:
    try:
        return checked_text(value, what)
    except InputError as error:
        raise RecordProblem(str(error)) from None


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# --------------------------------------------------------------------------- the formats


def _jsonl_records(path: Path) -> Iterator[tuple[int, str, object]]:
    """(record number from 0, "FILE line N", the record or the problem) per non-blank line."""
    number = 0
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {line_number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, where, RecordProblem(f"{where}: not JSON ({error.msg} at column {error.colno})")
        number += 1


def _json_records(path: Path) -> Iterator[tuple[int, str, object]]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{shown(path)} is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(records, list):
        raise InputError(f"{shown(path)}: expected a list of records ({{\"image\", \"question\", ...}}), "
                         f"got {_kind(records)}")
    for number, record in enumerate(records):
        yield number, f"{path.name} record {number + 1}", record


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{shown(path)} is not UTF-8 text (byte {error.start:,})") from None
    except OSError as error:
        from hae_cli.checks import os_error_message

        raise InputError(os_error_message(error, path, "data file")) from None


def _dataset_records(folder: Path, columns: Columns, split: str | None) -> Iterator[tuple[int, str, object]]:
    """The rows of a `save_to_disk` folder (a split of a DatasetDict: `split`, else "test", else
    the only one), image columns read as their encoded bytes."""
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        raise InputError("reading a saved dataset needs the datasets package: pip install 'hae-cli[datasets]' "
                         "(or pip install datasets)") from None
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the dataset in {shown(folder)}: {error}") from None
    name = folder.name
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        chosen = split or ("test" if "test" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise InputError(f"{shown(folder)} holds the splits {', '.join(splits)}: choose one with --split"
                             if split is None else f"--split {split!r} is not a split of {shown(folder)} "
                             f"(its splits: {', '.join(splits)})")
        dataset, name = dataset[chosen], f"{name}[{chosen}]"
    for what, column in columns.given().items():
        if column not in dataset.column_names:
            raise InputError(f"{FLAGS[what]} {column!r} is not a column of {shown(folder)} "
                             f"(its columns: {', '.join(dataset.column_names)})")
    # the rows as stored: an image column's cells stay {"bytes", "path"}, decoded later by hae's
    # one image loader (decoding here would re-encode them; casting would write into the folder)
    number = 0
    for batch in dataset.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            yield number, f"{name} row {number}", row
            number += 1
