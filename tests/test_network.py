"""One owner (transferlab.network) for "is the network there": the model registry and the public datasets
read the same environment switches and probe hosts the same way."""

from __future__ import annotations

import socket

import pytest

from transferlab.data.public import offline_reason
from transferlab.models.registry import is_online
from transferlab.network import address, offline_by_env, probe


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_the_offline_switch_is_read_the_same_by_weights_and_datasets(monkeypatch, value):
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", value)
    assert offline_by_env() == "TRANSFERLAB_OFFLINE=1 is set"
    assert offline_reason(["https://example.org/data.tgz"]) == "TRANSFERLAB_OFFLINE=1 is set"
    assert is_online(url="https://example.org") is False


def test_an_unreachable_host_is_named_and_probed_once(monkeypatch):
    monkeypatch.delenv("TRANSFERLAB_OFFLINE", raising=False)
    asked = []

    def unreachable(address, timeout=None):
        asked.append(address)
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    probe.cache_clear()
    try:
        assert address("http://data.example:8080/x.tgz") == ("data.example", 8080)
        assert offline_reason(["https://data.example/a.tgz", "https://data.example/b.tgz"]) == "data.example cannot be reached"
        assert not probe("data.example", 443, 3.0)
    finally:
        probe.cache_clear()
    assert asked == [("data.example", 443)]
