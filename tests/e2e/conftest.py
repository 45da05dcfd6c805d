"""The session's real Label Studio 1.23.2 (``testsupport.label_studio``), started once for the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testsupport.label_studio import LabelStudio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """A real Label Studio 1.23.2, started once per session (about 30-60 s), stopped at the end."""
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
