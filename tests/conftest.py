"""Shared fixtures: free ports and a real redis-server per test session.

Fixtures of one area live beside its tests; only what several areas share belongs here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.image_server import CloudStorage, FakeLabelStudio
from testsupport.paths import FIXTURES_DIR
from testsupport.processes import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One PyTorch thread for a module's tests: small networks run no faster on more, and CI shares its cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Real request bodies recorded from Label Studio 1.23.2."""
    return FIXTURES_DIR


# Image access (test_label_studio_client, test_image_fetch, test_image_decode): a cloud storage host that
# records any Label Studio token reaching it, and a fake Label Studio that checks tokens as the real one does.


@pytest.fixture(scope="module")
def cloud() -> Iterator[CloudStorage]:
    server = CloudStorage()
    yield server
    server.close()


@pytest.fixture()
def ls(cloud: CloudStorage) -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(cloud)
    yield server
    server.close()
    assert cloud.leaks == [], "the Label Studio token reached a host other than Label Studio"
