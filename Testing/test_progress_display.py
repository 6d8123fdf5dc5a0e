"""Progress on standard error: bars only on a terminal, log lines never break them."""

import logging

from SAMERegistrationLib.progress_display import StageProgress, TqdmLogHandler

STEPS = [("prepare", 0, 2), ("prepare", 2, 2), ("features", 1, 2), ("features", 2, 2)]


def test_no_bars_off_a_terminal_one_line_per_stage(capsys, caplog):
    progress = StageProgress(enabled=True, terminal=False)
    with caplog.at_level(logging.INFO, logger="SAMERegistrationLib.progress"):
        for step in STEPS:
            progress(*step)
        progress.close()
    assert [r.getMessage() for r in caplog.records] == ["stage: prepare", "stage: features"]
    assert capsys.readouterr().err == ""


def test_bars_on_a_terminal_and_log_lines_above_them(capsys):
    logger = logging.getLogger("test_progress_display")
    handler = TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        progress = StageProgress(enabled=True, terminal=True)
        progress("features", 1, 4)
        logger.warning("halfway through the features")
        progress("features", 4, 4)
        progress.close()
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "features" in err and "4/4" in err  # a bar was drawn
    pieces = err.replace("\r", "\n").split("\n")
    assert "WARNING halfway through the features" in pieces  # a line of its own


def test_disabled_progress_prints_nothing(capsys, caplog):
    progress = StageProgress(enabled=False, terminal=True)
    with caplog.at_level(logging.INFO):
        for step in STEPS:
            progress(*step)
    assert capsys.readouterr().err == "" and not caplog.records
