"""`okx-ingest --help` speaks to users, and every command's help ends with an example that runs it."""

from __future__ import annotations

import argparse

import pytest

from ingest.cli import _parser, main


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every subcommand's full name, nested ones too (`archive verify`)."""
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [prefix + name, *_commands(sub, f"{prefix}{name} ")]
    return out


COMMANDS = sorted(_commands(_parser()))


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_for_users_and_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of([], capsys)
    assert "okx-ingest demo" in text and "okx-ingest tail" in text
    for implementation_note in ("Imports are deferred", "import", "uvloop", "coroutine"):
        assert implementation_note not in text
    assert set(COMMANDS) >= {"run", "demo", "simulate", "backfill", "check", "tail", "archive", "archive verify",
                             "archive compact", "replay"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example_of_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(command.split(), capsys)
    examples = text[text.index("example"):]
    assert f"okx-ingest {command}" in examples
