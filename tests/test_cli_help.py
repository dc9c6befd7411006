"""`--help` as a user on an 80-column terminal meets it: grouped panels, whole examples, one meaning per short flag."""

from __future__ import annotations

import inspect

import pytest
import typer
from guarantees import cli
from typer.testing import CliRunner

from transferlab.cli import app

COMMAND = typer.main.get_command(app)


def _commands(group=COMMAND, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands())


def _help(*path: str) -> list[str]:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_train_help_groups_its_options_in_panels_and_shows_an_example_whole():
    lines = _help("train")
    text = "\n".join(lines)
    for panel in ("Model", "Training", "Fine-tuning", "Data", "Hardware and caches", "Output and run"):
        assert f"╭─ {panel}" in text, panel
    assert any(line.strip() == "transferlab train data/ --backbone efficientnet_lite2 -o runs/ants" for line in lines)
    assert "(train/ val/ [test/])" in " ".join(text.split())  # not eaten as a markup tag
    assert max(map(len, lines)) <= 80


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_verb_has_examples_that_fit_80_columns_unbroken(path):
    """Everything after the first paragraph of the docstring (details and examples) keeps its lines: each
    must show whole, not wrapped mid-command; no line is wider than the terminal or cut with an ellipsis."""
    lines = _help(*path)
    body = [line.strip() for paragraph in inspect.cleandoc(COMMANDS[path].help).split("\n\n")[1:]
            for line in paragraph.splitlines() if line.strip()]
    assert any(line.startswith("transferlab ") for line in body), "no example"
    assert [line for line in body if not any(line in shown for shown in lines)] == []
    assert [line for line in lines if len(line) > 80 or "…" in line] == []


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_no_help_text_loses_a_bracket_to_rich_markup(path):
    """'[test/]' or "'transferlab[mlflow]'" unescaped would be read as a markup tag and vanish from --help."""
    from rich.text import Text

    for text in [COMMANDS[path].help or "", *(p.help or "" for p in COMMANDS[path].params)]:
        assert Text.from_markup(text).plain == text.replace("\\[", "["), text


def test_short_o_means_out_in_every_verb():
    for path, command in COMMANDS.items():
        for param in command.params:
            if "-o" in param.opts:
                assert param.name == "out", (path, param.opts)
            elif param.name == "out" and param.param_type_name == "option":
                pytest.fail(f"{' '.join(path)} --out has no -o")


def test_recipe_run_refuses_a_setting_passed_to_o(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("recipe", "run", "flowers102-resnet50", "-o", "epochs_finetune=1")
    assert result.code == 2 and "--override epochs_finetune=1" in result.text
    assert not (tmp_path / "epochs_finetune=1").exists()


def test_an_epoch_log_line_fits_80_columns_with_its_level(caplog):
    """The line printed once per epoch stays on one line of an 80-column terminal (level column: 9)."""
    import logging

    from transferlab.training.run import _print_epoch

    logger = logging.getLogger("transferlab")
    logger.addHandler(caplog.handler)  # the CLI may have turned propagation off
    try:
        with caplog.at_level(logging.INFO, logger="transferlab"):
            _print_epoch({"phase": "finetune", "epoch": 99, "train_loss": 2.3456, "train_accuracy": 0.5,
                          "val_loss": 2.5, "val_accuracy": 1.0, "epoch_seconds": 999.4})
    finally:
        logger.removeHandler(caplog.handler)
    line = caplog.messages[-1]
    assert line.startswith("finetune epoch 99") and "999s" in line and len(line) + 9 <= 80
