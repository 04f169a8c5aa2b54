"""subword-nmt's progress bar, shown only when the user asks for verbose output."""

from __future__ import annotations

import io
import sys

from experiments.core.console import VERBOSE_ENV


def test_subword_nmt_progress_bar_only_when_verbose(tmp_path, monkeypatch):
    from experiments.pipelines.fairseq import translation_text as tt

    text = tmp_path / "train.txt"
    text.write_text("das haus ist klein\nein kleines haus\n" * 20)
    for flag, shown in (("0", False), ("1", True)):
        monkeypatch.setenv(VERBOSE_ENV, flag)
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        tt.learn_bpe(text, tmp_path / "codes", 10)
        monkeypatch.undo()
        assert ("it/s" in err.getvalue()) is shown
