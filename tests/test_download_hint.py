"""When the checkpoint download fails, the message says where to put a hand-downloaded file and that
``--checkpoint PATH`` works (no network here: the official URL is pointed at a closed local port)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from backend.cli import main
from model import download


def test_a_failed_download_says_where_to_put_the_file_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    entry = download.CHECKPOINTS["vit_t"]
    monkeypatch.setitem(download.CHECKPOINTS, "vit_t", replace(entry, url="http://127.0.0.1:9/mobile_sam.pt"))
    assert main(["download", "vit_t", "--dir", str(tmp_path / "models")]) == 1
    message = capsys.readouterr().err
    assert "could not download vit_t" in message
    assert f"put it at {tmp_path / 'models' / entry.filename}" in message
    assert "http://127.0.0.1:9/mobile_sam.pt" in message and "--checkpoint /path/to/mobile_sam.pt" in message


def test_the_hint_names_the_checksum_of_files_that_have_one(tmp_path: Path) -> None:
    hint = download.manual_download_hint("vit_b", tmp_path)
    assert "sha256 starts with 01ec64" in hint and str(tmp_path / "sam_vit_b_01ec64.pth") in hint
    assert download.manual_download_hint("no-such-model", tmp_path) == ""


def test_an_unknown_name_gets_no_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "vit_x", "--dir", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert "unknown checkpoint" in message and "by hand" not in message
