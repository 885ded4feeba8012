"""Results that survive a stop: `config.json` says what the run is, `results.jsonl` gets one
line per item as soon as the item is done (written whole, flushed and synced, by one writer).

A run stopped by Ctrl-C, a kill or a crash leaves every finished item on disk, and at most a
torn last line, which `--resume` drops before it appends; it runs only the items that have no
line yet, and refuses a folder written for another configuration (model, settings, task,
data): results of two configurations must never be summarised together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hae_cli.checks import kind_of, path_status, shown, write_failed
from hae_cli.errors import InputError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"


class ResultStore:
    """The results of one configuration in `folder`: those already there (with `resume`), and
    each new one appended as it arrives."""

    def __init__(self, folder: Path, config: dict, resume: bool = False) -> None:
        self.folder, self.config = folder, config
        self.config_path, self.path = folder / CONFIG_FILE, folder / RESULTS_FILE
        self.results: dict[str, dict] = {}
        status = path_status(folder, "--out folder")
        if status is not None and kind_of(status) != "folder":
            raise InputError(f"--out {shown(folder)} is a {kind_of(status)}; give a folder for the results")
        written = path_status(self.path, "results file") is not None
        if written and not resume:
            raise InputError(f"{shown(self.path)} holds the results of an earlier run: add --resume to continue "
                             "it, or give another --out folder")
        if written:
            self._check_config()
            self._read()
        else:
            self._start()
        self.resumed = len(self.results)
        self._file = None

    # --- the configuration ---

    def _start(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.config_path.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, self.config_path)
        except OSError as error:
            raise write_failed(error, self.config_path) from None

    def _check_config(self) -> None:
        try:
            stored = json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"--resume: {shown(self.folder)} has results but no {CONFIG_FILE}, so what they "
                             "were run with is unknown; give another --out folder") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"--resume: cannot read {shown(self.config_path)}: {error}") from None
        if stored != self.config:
            raise InputError(f"--resume: {shown(self.folder)} holds a run of another configuration "
                             f"({difference(stored, self.config)}); run with the same options, or give another "
                             "--out folder")

    # --- the results ---

    def _read(self) -> None:
        """The results on disk; a torn last line (the writer was killed mid-line) is cut off."""
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise InputError(f"--resume: cannot read {shown(self.path)}: {error.strerror or error}") from None
        complete = data.rfind(b"\n") + 1
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            try:
                record = json.loads(line)
                self.results[str(record["id"])] = record
            except (ValueError, KeyError, TypeError):
                raise InputError(f"--resume: {shown(self.path)} line {number} is not a result (edited by hand?); "
                                 "give another --out folder") from None
        if complete < len(data):
            try:
                os.truncate(self.path, complete)
            except OSError as error:
                raise write_failed(error, self.path) from None

    def append(self, record: dict) -> None:
        """One item's result, on disk before this returns."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise write_failed(error, self.path) from None
        self.results[str(record["id"])] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def difference(stored: dict, wanted: dict, path: str = "") -> str:
    """The first thing two configurations disagree on, in words."""
    for key in list(wanted) + [k for k in stored if k not in wanted]:
        here = f"{path}.{key}" if path else key
        a, b = stored.get(key), wanted.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            return difference(a, b, here)
        if isinstance(a, list) and isinstance(b, list):
            return _list_difference(a, b, here)
        return f"{here}: {_short(b)} now, {_short(a)} in the stored run"
    return "they differ"


def _list_difference(stored: list, wanted: list, here: str) -> str:
    """The first entry where two lists part; a plan's settings by their labels."""
    for k, (a, b) in enumerate(zip(stored, wanted), start=1):
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict) and a.get("label") != b.get("label"):
                return f"{here} entry {k}: {b.get('label')!r} now, {a.get('label')!r} in the stored run"
            return difference(a, b, f"{here} entry {k}") if isinstance(a, dict) and isinstance(b, dict) \
                else f"{here} entry {k}: {_short(b)} now, {_short(a)} in the stored run"
    return f"{here}: {len(wanted)} entries now, {len(stored)} in the stored run"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
