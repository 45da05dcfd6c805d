"""The e2e fixtures' own failure mode, checked without starting anything (not marked e2e: it is instant)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testsupport import label_studio as e2e


def test_missing_label_studio_fails_with_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a machine where scripts/test never ran, the e2e tests fail with the fix, not a FileNotFoundError."""
    monkeypatch.setattr(e2e, "LABEL_STUDIO_BIN", tmp_path / "no-venv" / "bin" / "label-studio")
    server = e2e.LabelStudio(tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"scripts/test.*label-studio==1\.23\.2"):
        server.start()
    assert server.process is None
