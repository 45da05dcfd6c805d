"""The session's real Label Studio 1.23.2 (``testsupport.label_studio``), started once for the e2e tests, and a
module's `sam-backend serve` on the module's ``checkpoint`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.label_studio import LabelStudio, SamBackend


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """A real Label Studio 1.23.2, started once per session (about 30-60 s), stopped at the end."""
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sam_backend_class() -> type[SamBackend]:
    """The server ``sam_backend`` starts; a module overrides this fixture for other settings (its environment)."""
    return SamBackend


@pytest.fixture(scope="module")
def sam_backend(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, label_studio: LabelStudio,
                sam_backend_class: type[SamBackend]) -> Iterator[SamBackend]:
    """`sam-backend serve` on the checkpoint the test module defines (its own ``checkpoint`` fixture)."""
    backend = sam_backend_class(tmp_path_factory.mktemp("sam-backend"), checkpoint, label_studio)
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()
