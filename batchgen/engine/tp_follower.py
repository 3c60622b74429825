"""A follower of a tensor-parallel group: ``python -m batchgen.engine.tp_follower``.

Invariant: it computes only what its leader (``batchgen.engine.tensor_parallel``) sends, in the
order sent, and writes nothing: it loads its part of the weights, builds the engine the leader
names, runs each batch and drops the samples (the leader keeps its own, the same). It exits 0
when told to end, and at once, without cleaning up, when its stdin closes (the leader is gone):
nothing of it is worth keeping, and a collective it waits in would never return.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

from batchgen.engine import devices, tensor_parallel
from batchgen.engine.static import StaticEngine
from batchgen.errors import Interrupted

log = logging.getLogger("batchgen.tp_follower")


def _watch_leader() -> None:
    """Exit once stdin closes: the leader that started this process has ended."""
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os._exit(1)


def serve(model: devices.Model, control, ask) -> None:
    """Run the leader's messages until it says ``end``."""
    engine = None
    while True:
        message = tensor_parallel.receive(control)
        if message[0] == "end":
            return
        if message[0] == "engine":
            engine = StaticEngine(model.load(), model.tokenizer, **message[1])
            engine.stop = tensor_parallel.GroupStop(None, ask)
            continue
        _, records, seed, sampling = message
        try:
            engine.generate(records, seed, sampling)
        except Interrupted:
            pass  # the leader stopped at the same step
        except Exception as e:  # noqa: BLE001 - the leader meets the same error, and decides
            log.warning("tensor-parallel rank: a batch failed as on the leader: %s", e)


def main() -> None:
    """Join the group, load this rank's part of the weights, serve the leader."""
    given = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_watch_leader, name="batchgen-tp-leader", daemon=True).start()
    devices.set_threads(given["threads"])
    model = given["model"]
    control = tensor_parallel.join(given["rank"], given["size"], given["port"], model.device)
    model.load()
    serve(model, control, lambda event: tensor_parallel.ask_stop(event, control))


if __name__ == "__main__":
    main()
