"""A newcomer's first minutes: every example in the README, docs/FAMILIES.md and `--help` runs
as written after the README's install: it names files that exist (the shipped samples), asks
the demo model only words it knows, needs no optional extra unless it says so; `hae families`
cuts no name at 80 columns."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hae_cli import cli

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = {"--show-kept", "--plot", "--json", "--out", "-o", ">"}  # what follows is written, not read
PLACEHOLDERS = {"my_dataset/"}  # the README says it stands for the user's own
FILE = re.compile(r"(\.(png|jpe?g|jsonl|json|txt)|/)$", re.IGNORECASE)


def doc_commands() -> list[str]:
    commands = []
    for doc in (REPO / "README.md", REPO / "docs" / "FAMILIES.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if re.match(r"^(\w+=\S+ )*hae ", line):
                    commands.append(line)
    return commands


def help_commands() -> list[str]:
    texts = [cli.app.info.help or ""]
    for command in cli.app.registered_commands:
        texts += [command.epilog or "", command.callback.__doc__ or ""]
    found = [m for text in texts for m in re.findall(r"\[cyan\](.*?)\[/cyan\]", text, flags=re.S)]
    return [" ".join(c.replace("\\[", "[").split()) for c in found if c.strip().startswith(("hae ", "printf "))]


def examples() -> list[str]:
    return doc_commands() + help_commands()


def read_files(command: str) -> list[str]:
    words = shlex.split(command.split(" | ")[-1] if command.startswith("printf") else command)
    return [word for before, word in zip(["", *words], words)
            if FILE.search(word) and before not in OUTPUTS and before not in ("--model", "-m")
            and "/" in word + "/" and word not in PLACEHOLDERS and not word.startswith("http")]


def test_there_are_examples_to_check():
    assert len(doc_commands()) > 15 and len(help_commands()) > 20


@pytest.mark.parametrize("command", examples())
def test_an_example_names_files_that_exist(command):
    missing = [word for word in read_files(command) if not glob.glob(str(REPO / word))]
    assert missing == [], command


@pytest.mark.parametrize("command", [c for c in examples() if "--model" not in c and " -m " not in c])
def test_an_example_on_the_demo_asks_only_words_it_knows(command):
    from hae_cli.api import unknown_pieces
    from hae_cli.model.phi3v.checkpoint import load_tokenizer
    from hae_cli.model.loading import DEMO_MODEL_DIR

    tokenizer = load_tokenizer(DEMO_MODEL_DIR)
    words = shlex.split(command.split(" | ")[-1] if command.startswith("printf") else command)
    texts = [w for w in words if " " in w] + (command.split("'")[1].split("\\n") if command.startswith("printf") else [])
    assert [(text, unknown_pieces(tokenizer, text)) for text in texts if unknown_pieces(tokenizer, text)] == []


def test_an_example_needing_an_optional_extra_says_so():
    for command, text in [(c, c) for c in doc_commands()] + [(c, "") for c in help_commands()]:
        if "--plot" in command:
            surrounding = (cli.app.info.help or "") + "".join(c.epilog or "" for c in cli.app.registered_commands)
            assert "hae-cli\\[plot]" in surrounding or "[plot]" in text, command


def test_families_cuts_no_name_at_80_columns():
    from hae_cli.model.loading import families

    result = CliRunner().invoke(cli.app, ["families"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80
    for cls in set(families().values()):
        assert cls.family in result.stdout
    wide = CliRunner().invoke(cli.app, ["policies"], env={"COLUMNS": "80"})
    assert "…" not in wide.stdout  # not named in the issue: the papers' URLs were cut too
