"""policyd's log lines: one logfmt line per event on stderr; caller-supplied values cannot forge
fields or lines; the level threshold holds; a traceback stays on its line."""

from __future__ import annotations

import logging

import pytest

from policyd import logfmt


def test_line_format_and_quoting(capsys: pytest.CaptureFixture[str]) -> None:
    logfmt.setup()
    logfmt.info("exported", export="/org/qubes/BlockBroker1/export/1", diskseq=7)
    logfmt.warning("odd", source='/a b"c\nlevel=error', empty="")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "component=policyd level=info msg=exported export=/org/qubes/BlockBroker1/export/1 "
        "diskseq=7",
        'component=policyd level=warning msg=odd source="/a b\\"c\\x0alevel=error" empty=""',
    ]


def test_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    logfmt.setup(logging.WARNING)
    try:
        logfmt.info("hidden")
        logfmt.error("shown")
    finally:
        logfmt.setup()
    assert capsys.readouterr().err == "component=policyd level=error msg=shown\n"


def test_traceback_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    logfmt.setup()
    try:
        raise ValueError("boom")
    except ValueError:
        logfmt.error("call failed", exc=True, method="Attach")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('component=policyd level=error msg="call failed" method=Attach ')
    assert "traceback=" in line and "ValueError: boom" in line


def test_a_failing_stderr_loses_the_line_not_the_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """journald's stream gone (EPIPE) or stderr closed: logging must not raise into the code
    that just committed a XenStore transaction (it would close a device XenStore names)."""

    class Broken:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise ValueError("I/O operation on closed file")

    logfmt.setup()
    monkeypatch.setattr("sys.stderr", Broken())
    logfmt.info("exported", export="/org/qubes/BlockBroker1/export/1")
    logfmt.error("call failed", exc=True)
