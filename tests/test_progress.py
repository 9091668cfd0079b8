"""The progress rule of every command: tqdm on a terminal, about ten whole lines per bar in a log."""

from __future__ import annotations

import contextlib
import io
import logging

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from runtime.common import progress as progress_module
from runtime.common.progress import LogLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_a_log_gets_a_line_every_tenth_and_no_carriage_returns():
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        with progress_bar(total=1000, desc="INT8 quality gate", unit="step") as bar:
            assert isinstance(bar, LogLines)
            for i in range(1000):
                bar.update(1)
                bar.set_postfix_str("float32" if i < 500 else "int8")  # refreshes: never an extra line
    lines = _lines(log.getvalue())
    assert len(lines) == 10
    assert lines[0].startswith("INT8 quality gate:  10%") and "100/1000" in lines[0]
    assert "1000/1000" in lines[-1] and "int8" in lines[-1]


def test_iteration_and_uneven_updates_end_with_one_last_line():
    log = io.StringIO()
    assert list(progress_bar(range(95), desc="loading", file=log)) == list(range(95))
    lines = _lines(log.getvalue())
    assert 10 <= len(lines) <= 11 and "95/95" in lines[-1]

    log = io.StringIO()
    with progress_bar(total=1000, file=log, leave=False) as bar:  # leave=False: the log keeps the end anyway
        for _ in range(140):
            bar.update(7)  # 980: crosses tenths unevenly, never lands on the total
        bar.update(20)
    lines = _lines(log.getvalue())
    assert 9 <= len(lines) <= 11 and "1000/1000" in lines[-1]


def test_unknown_total_writes_a_line_per_interval(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    with progress_bar(desc="download", unit="B", file=log) as bar:
        for _ in range(3):
            bar.update(100)
    assert len(_lines(log.getvalue())) == 3

    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 3600.0)
    log = io.StringIO()
    with progress_bar(desc="download", unit="B", file=log) as bar:
        for _ in range(300):
            bar.update(100)
    lines = _lines(log.getvalue())
    assert len(lines) == 1 and "30000B" in lines[0]  # only the end


def test_logging_through_tqdm_write_leaves_whole_lines():
    log = io.StringIO()
    logger = logging.getLogger("runtime.test_progress")
    logger.addHandler(logging.StreamHandler(log))
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(log), logging_redirect_tqdm(loggers=[logger]):
            with progress_bar(total=100, desc="training") as bar:
                for i in range(100):
                    bar.update(1)
                    if i % 25 == 0:
                        logger.info("step %d", i)
    finally:
        logger.handlers.clear()
    lines = _lines(log.getvalue())
    assert len(lines) == 10 + 4 and all(line.startswith(("training:", "step ")) for line in lines)


def test_a_terminal_gets_the_usual_tqdm_bar():
    term = Terminal()
    with progress_bar(total=1000, desc="sampling", file=term) as bar:
        assert type(bar) is tqdm
        for _ in range(1000):
            bar.update(1)
    assert term.getvalue().startswith("\rsampling:   0%") and "1000/1000" in term.getvalue()


def test_disabled_writes_nothing():
    log = io.StringIO()
    with progress_bar(total=10, file=log, disable=True) as bar:
        bar.update(10)
        bar.set_postfix(loss="0.1")
    assert log.getvalue() == ""
