"""The hub check: offline variables skip it, a refused or silent hub is named within the timeout."""

from __future__ import annotations

import socket
import time

import pytest

from batchgen.errors import DataError
from batchgen.inputs.hub import check_dataset, hub_unreachable

OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def online(monkeypatch):
    for name in OFFLINE:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_offline_variable_asks_nothing(online):
    online.setenv("HF_ENDPOINT", closed_port())
    assert hub_unreachable(OFFLINE) is not None
    online.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_unreachable(OFFLINE) is None


def test_a_silent_hub_is_given_up_after_the_timeout(online):
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        online.setenv("HF_ENDPOINT", endpoint + "/")
        started = time.monotonic()
        why = hub_unreachable(OFFLINE, timeout=0.3)
    # The request's own timeout and the wait for it end together: either may tell.
    assert why in (f"{endpoint}: no answer within 0.3 s", f"{endpoint}: timed out")
    assert time.monotonic() - started < 5


def test_an_unreachable_hub_fails_a_dataset_not_in_the_cache(online):
    endpoint = closed_port()
    online.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(DataError, match="hub is unreachable") as e:
        check_dataset("nobody/no-such-dataset")
    assert endpoint in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
