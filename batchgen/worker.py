"""One worker's shard loop: claim a shard, generate it, publish it, release it; then steal.

A worker takes its own share of the shards first (``workers.assign_shards``), then, with
stealing on, any unfinished shard whose claim is free or expired, so a slow or dead worker does
not hold the job hostage. It leaves only when every shard is published, or it is told to stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.batching import BatchRunner, Interrupted
from batchgen.claims import ClaimStore, Heartbeat, default_owner
from batchgen.progress import Progress, Totals
from batchgen.prompts import PromptRecord, Skipped
from batchgen.sharding import Shard
from batchgen.workers import WorkerInfo, assign_shards
from batchgen.writer import output_schema, write_shard

log = logging.getLogger(__name__)

# Seconds between looks at shards that other live workers hold, while waiting for the last ones.
WAIT_POLL = 1.0


@dataclass
class ShardWork:
    """What the loop needs to know about one shard."""

    shard: Shard
    records: list[PromptRecord]
    skipped: list[Skipped]


@dataclass
class LoopResult:
    """What this worker did."""

    totals: Totals = field(default_factory=Totals)
    published: list[int] = field(default_factory=list)
    generate_seconds: float = 0.0
    write_seconds: float = 0.0


def shard_rows(records: list[PromptRecord], results: dict) -> tuple[list[dict], Totals]:
    """Output rows of one shard (row order, then sample order) and their totals."""
    totals = Totals()
    out = []
    for record in records:
        outs = results.get(record.index)
        if outs is None:
            continue  # failed; recorded with its reason
        totals.rows += 1
        totals.prompt_tokens += len(record.token_ids)
        for k, s in enumerate(outs):
            totals.samples += 1
            totals.completion_tokens += s.completion_tokens
            totals.finish_reasons[s.finish_reason] = (
                totals.finish_reasons.get(s.finish_reason, 0) + 1
            )
            out.append(
                {
                    "id": record.id,
                    "sample_index": k,
                    "prompt": record.text,
                    "response": s.text,
                    "finish_reason": s.finish_reason,
                    "prompt_tokens": len(record.token_ids),
                    "completion_tokens": s.completion_tokens,
                    **record.kept,
                }
            )
    return out, totals


class ShardLoop:
    """Runs shards for one worker against the output folder's claims."""

    def __init__(
        self,
        out_dir: Path,
        worker: WorkerInfo,
        batcher: BatchRunner,
        meta: dict,
        kept_types: dict,
        compression: str,
        lease_seconds: float,
        steal: bool,
        progress: Progress,
    ):
        self.out_dir = out_dir
        self.worker = worker
        self.batcher = batcher
        self.meta = meta
        self.kept_types = kept_types
        self.compression = compression
        self.steal = steal
        self.progress = progress
        self.store = ClaimStore(out_dir, default_owner(worker.rank), lease_seconds)
        self.result = LoopResult()
        self.counted: set[int] = set()  # shards already on the progress bar

    def _published(self, shard: Shard) -> bool:
        done = (self.out_dir / shard.name).exists()
        if done and shard.index not in self.counted:  # another worker's: show it on the bar
            self.counted.add(shard.index)
            self.progress.update(shard.stop - shard.start, 0)
        return done

    def run(self, work: dict[int, ShardWork]) -> LoopResult:
        """Process shards until all are published; raises ``Interrupted`` on a stop request."""
        own = assign_shards(sorted(work), self.worker.rank, self.worker.world_size)
        # Stealers start from the far end of the others' lists, where their owners arrive last.
        mine = set(own)
        others = [i for i in sorted(work, reverse=True) if i not in mine] if self.steal else []
        order = own + others
        with Heartbeat(self.store):
            try:
                while True:
                    for index in order:
                        self._try(work[index])
                    left = [i for i in order if not self._published(work[i].shard)]
                    if not left:
                        return self.result
                    self._check_stop()
                    time.sleep(WAIT_POLL)  # held by live workers: wait for them or their expiry
            finally:
                self.store.release_all()

    def _check_stop(self) -> None:
        if self.batcher.stop.is_set():
            raise Interrupted

    def _try(self, item: ShardWork) -> None:
        shard = item.shard
        self._check_stop()
        if self._published(shard) or not self.store.try_claim(shard.index):
            return
        try:
            if self._published(shard):  # finished by someone between our look and our claim
                return
            self._generate(item)
        finally:
            self.store.release(shard.index)

    def _generate(self, item: ShardWork) -> None:
        shard = item.shard
        padded_before = self.batcher.engine.padded_tokens
        started = time.perf_counter()
        results, failed = self.batcher.run(item.records, self.progress.update)
        generate_seconds = time.perf_counter() - started
        rows, totals = shard_rows(item.records, results)
        totals.failed = len(failed)
        totals.skipped = len(item.skipped)
        totals.padded_tokens = self.batcher.engine.padded_tokens - padded_before
        self.progress.update(len(item.skipped), 0)
        self.counted.add(shard.index)
        if not self.store.owns(shard.index):
            self.store.renew()  # a late heartbeat leaves the claim ours but not yet publishable
        if not self.store.owns(shard.index):
            log.warning("lost the claim on %s while generating it; dropping our copy", shard.name)
            return
        shard_meta = {
            **self.meta,
            "shard": {
                "index": shard.index,
                "start": shard.start,
                "stop": shard.stop,
                "totals": totals.to_dict(),
                "skipped": [{"id": s.id, "reason": s.reason} for s in item.skipped],
                "failed": [{"id": s.id, "reason": s.reason} for s in failed],
                "timing": {"finished_at": time.time(), "generate_seconds": generate_seconds},
                "worker": {
                    "rank": self.worker.rank,
                    "world_size": self.worker.world_size,
                    "owner": self.store.owner,
                },
            },
        }
        started = time.perf_counter()
        schema = output_schema(self.kept_types, shard_meta)
        if write_shard(self.out_dir, shard.name, rows, schema, self.compression):
            self.result.published.append(shard.index)
            self.result.totals.add(totals)
        self.result.generate_seconds += generate_seconds
        self.result.write_seconds += time.perf_counter() - started
