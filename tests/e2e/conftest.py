"""The loopback provider server, one per test module, reset for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.provider_server import REPLY, ProviderServer


@pytest.fixture(scope="module")
def _server() -> Iterator[ProviderServer]:
    server = ProviderServer().start()
    yield server
    server.stop()


@pytest.fixture
def server(_server: ProviderServer) -> ProviderServer:
    _server.reset()
    _server.cached = _server.cache_write = _server.cache_write_1h = _server.reasoning = 0
    _server.web_searches = _server.web_search_errors = 0
    _server.reply = REPLY
    return _server
