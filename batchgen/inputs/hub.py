"""Whether the Hugging Face hub answers, asked once and briefly before a hub name is loaded.

Invariant: a hub dataset or model that cannot be fetched fails in seconds (one bounded request),
not after the libraries' minute of retries, and never when the hub is not needed: offline
variables set, or (for a dataset) a copy in the cache, which is then read with a warning.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from batchgen.errors import DataError

# Seconds the hub gets to answer one request before a hub name is given up as unreachable.
HUB_CHECK_SECONDS = 3.0
_TRUE = {"1", "on", "yes", "true"}


def hub_unreachable(
    offline_vars: tuple[str, ...], timeout: float = HUB_CHECK_SECONDS
) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached, else None.

    One HEAD request, through the proxies the environment names, bounded by ``timeout`` in all
    (name lookup included). Any HTTP answer, or a TLS failure (the host answered), counts as
    reachable: the hub libraries then report what is wrong. None, without a request, when one of
    ``offline_vars`` is set: the libraries read their cache and ask nothing of the network.
    """
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in offline_vars):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(endpoint, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except urllib.error.URLError as e:
            reached = isinstance(e.reason, ssl.SSLError)
            outcome.append(None if reached else f"{endpoint}: {e.reason}")
        except (OSError, ValueError) as e:
            outcome.append(f"{endpoint}: {e}")

    thread = threading.Thread(target=probe, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{endpoint}: no answer within {timeout:g} s"


def _dataset_cached(location: str) -> bool:
    """Whether a hub dataset has a copy in the local caches (the hub's or ``datasets``')."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{location.replace('/', '--')}"
    built = Path(datasets.config.HF_DATASETS_CACHE) / location.replace("/", "___")
    return hub.is_dir() or built.is_dir()


def check_dataset(location: str) -> None:
    """Fail at once, not after a minute of retries, when a hub dataset cannot be fetched.

    Raises:
        DataError: the hub is unreachable and the dataset is not in the cache.
    """
    why = hub_unreachable(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if why is None:
        return
    if _dataset_cached(location):
        print(
            f"batchgen: the Hugging Face hub is unreachable ({why}); {location!r} is in the "
            "cache and is read from there after the library's retries: set HF_HUB_OFFLINE=1 "
            "to skip them.",
            file=sys.stderr,
            flush=True,
        )
        return
    raise DataError(
        f"dataset.path={location!r} is no local file or folder, so it names a hub dataset, but "
        f"the Hugging Face hub is unreachable ({why}). To run offline, set dataset.path to a "
        "local jsonl/json/parquet/csv file or folder, or set HF_HUB_OFFLINE=1 to read a hub "
        "dataset from the local cache (~/.cache/huggingface, $HF_HOME); HF_ENDPOINT names "
        "another hub."
    )
