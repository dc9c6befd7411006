"""One progress bar (logs.progress_bar) for every long loop: on an interactive stderr only, with the
loop's description and its count."""

from __future__ import annotations

from pathlib import Path

import rich.console

from transferlab.logs import progress_bar

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"


def _terminal(monkeypatch) -> None:
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))


def test_off_a_terminal_nothing_shows_and_nothing_is_counted(capsys):
    counted = []
    with progress_bar(True, "evaluating", lambda: counted.append(1) or 3) as advance:
        advance()
        advance(2)
    assert counted == [] and capsys.readouterr().err == ""


def test_on_a_terminal_the_bar_shows_its_description_and_count(monkeypatch, capsys):
    _terminal(monkeypatch)
    with progress_bar(True, "extracting features", lambda: 3) as advance:
        advance()
        advance(2)
    err = capsys.readouterr().err
    assert "extracting features" in err and "3/3" in err


def test_a_disabled_bar_shows_nothing_even_on_a_terminal(monkeypatch, capsys):
    _terminal(monkeypatch)
    with progress_bar(False, "predicting", 5) as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_no_module_but_logs_builds_a_rich_bar():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "logs.py"
                 and ("rich.progress" in (text := p.read_text(encoding="utf-8")) or "track(" in text)]
    assert not offenders, offenders
