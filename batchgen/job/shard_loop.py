"""One worker's shard loop: claim a shard, generate it, publish it, release it; then steal.

A worker takes its own share of the shards first (``ranks.assign_shards``), then, with
stealing on, any unfinished shard whose claim is free or expired, so a slow or dead worker does
not hold the job hostage. It leaves only when every shard is published, or it is told to stop.

Invariant: a worker reads, renders and verifies only what it touches. A finished shard of its
own share is verified (decoded whole, fingerprint and rows' digest) when the loop reaches it,
before it is skipped; another worker's finished shard is skipped unread; an unfinished one is
rendered and tokenized only once this worker holds its claim. The model loads at the first
shard that needs generating, so a finished job never loads it. A shard in hand is watched
(``watchdog``): if its work stops moving for ``runner.stall_seconds``, the worker releases its
claims and exits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.cluster.claim_files import default_owner
from batchgen.cluster.claims import ClaimStore
from batchgen.cluster.heartbeat import Heartbeat
from batchgen.cluster.ranks import WorkerInfo, assign_shards
from batchgen.cluster.watchdog import Watchdog
from batchgen.errors import Interrupted
from batchgen.inputs.dataset import Rows, Stream
from batchgen.job.session import Plan, Session
from batchgen.job.shard_inputs import ShardInputs, ShardWork
from batchgen.progress import Progress
from batchgen.store import checkpoints, manifest
from batchgen.store.rows import shard_rows
from batchgen.store.shards import Shard
from batchgen.store.summary import Totals
from batchgen.store.verify import OTHER_CONFIG, quarantine, reason_kind, verify_shard
from batchgen.store.writer import output_schema, shard_metadata, write_shard

log = logging.getLogger(__name__)

# Seconds between looks at shards that other live workers hold, while waiting for the last ones.
WAIT_POLL = 1.0


@dataclass
class LoopResult:
    """What this worker did."""

    totals: Totals = field(default_factory=Totals)
    resumed: int = 0  # finished shards of its share that it verified and skipped
    tokenize_seconds: float = 0.0
    generate_seconds: float = 0.0
    write_seconds: float = 0.0
    rows_seen: int | None = None  # streaming: rows in the stream, once it has ended
    kept_rows: int = 0  # rows of the unfinished shard in hand that checkpoints hold


@dataclass(frozen=True)
class LoopSettings:
    """The job settings the loop needs beyond its plan."""

    kept_types: dict
    compression: str
    lease_seconds: float
    steal: bool


class ShardLoop:
    """Runs shards for one worker against the output folder's claims.

    Args:
        out_dir: the output folder.
        worker: this worker's rank and world size.
        inputs: builds a shard's records (and digest) from the dataset.
        session: generates them (the model loads when the first shard needs generating); its
            ``stop``, set by a signal, stops the loop between batches.
        plan: the job's settings as resolved for the model.
        meta: the run metadata every shard's footer carries.
        settings: ``kept_types``, ``compression``, ``lease_seconds`` and ``steal``.
        progress: the bar, over the rows of this worker's share (and the shards it steals).
        published: shards published before this run started (not counted on the bar).
        watchdog: watches each shard in hand; the loop adds its own give-up steps (stop the
            claims' heartbeat, release them).
    """

    def __init__(
        self,
        out_dir: Path,
        worker: WorkerInfo,
        inputs: ShardInputs,
        session: Session,
        plan: Plan,
        meta: dict,
        settings: LoopSettings,
        progress: Progress,
        published: set[int],
        watchdog: Watchdog,
    ):
        self.out_dir = out_dir
        self.worker = worker
        self.inputs = inputs
        self.session = session
        self.plan = plan
        # Samples per row, for verifying finished shards: None where rows may set their own.
        self.samples = None if plan.dataset.sampling_column else plan.sampling.num_return_sequences
        self.stop = session.stop
        self.meta = meta
        self.settings = settings
        self.progress = progress
        self.store = ClaimStore(out_dir, default_owner(worker.rank), settings.lease_seconds)
        self.heartbeat = Heartbeat(self.store)
        self.watchdog = watchdog
        watchdog.on_stall(self.heartbeat.stop)
        watchdog.on_stall(self.store.release_all)
        self.result = LoopResult()
        self.counted = set(published)  # shards on the bar, or not to be put there
        self.seen: set[int] = set()  # shards the loop has reached once

    def run(self, shards: list[Shard]) -> LoopResult:
        """Process shards until all are published; raises ``Interrupted`` on a stop request."""
        by_index = {s.index: s for s in shards}
        own = assign_shards(sorted(by_index), self.worker.rank, self.worker.world_size)
        # Stealers start from the far end of the others' lists, where their owners arrive last.
        mine = set(own)
        others = [i for i in reversed(sorted(by_index)) if i not in mine]
        pending = own + (others if self.settings.steal else [])
        with self.heartbeat, self.watchdog:
            try:
                while True:
                    # A published shard stays published: each pass looks only at what is left,
                    # so waiting for a few stragglers costs a few looks, not one per shard.
                    pending = [i for i in pending if not self._visit(by_index[i], i in mine)]
                    if not pending:
                        return self.result
                    self._check_stop()
                    time.sleep(WAIT_POLL)  # held by live workers: wait for them or their expiry
            finally:
                self._release_all()

    def run_stream(self, stream: Stream, rows_per_shard: int) -> LoopResult:
        """Process this worker's shards of a stream (shard ``k`` is rank ``k % world_size``'s).

        The stream is read once, in order; other ranks' rows are passed over in Arrow. A shard
        that another live worker holds is kept in memory and waited for at the end.
        """
        held: dict[int, tuple[Shard, Rows]] = {}
        with self.heartbeat, self.watchdog:
            try:
                for start, batch in stream.blocks(rows_per_shard):
                    shard = Shard(start // rows_per_shard, start, start + batch.num_rows)
                    self.result.rows_seen = shard.stop
                    if shard.index % self.worker.world_size != self.worker.rank:
                        continue
                    rows = stream.rows(start, batch)
                    if not self._visit(shard, True, rows):
                        held[shard.index] = (shard, rows)
                while held:
                    self._check_stop()
                    time.sleep(WAIT_POLL)
                    for index, (shard, rows) in list(held.items()):
                        if self._visit(shard, True, rows):
                            del held[index]
                return self.result
            finally:
                self._release_all()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted

    def _published(self, shard: Shard, own: bool) -> bool:
        done = (self.out_dir / shard.name).exists()
        if done and own and shard.index not in self.counted:  # ours, made by a stealer
            self.counted.add(shard.index)
            self.progress.others(shard.stop - shard.start)
        return done

    def _visit(self, shard: Shard, own: bool, rows: Rows | None = None) -> bool:
        """Verify, skip or generate one shard; True when it is published."""
        self._check_stop()
        first = shard.index not in self.seen
        self.seen.add(shard.index)
        if self._published(shard, own) and (not (own and first) or self._trusted(shard, rows)):
            return True
        if not self.store.try_claim(shard.index):
            return False
        try:
            with self.watchdog.watch(shard.name):
                if self._published(shard, own):  # finished by someone between look and claim
                    return True
                if not own:  # a stolen shard joins the bar, which counts this worker's share
                    self.progress.grow(shard.stop - shard.start)
                started = time.perf_counter()
                work = self.inputs.build(shard, rows)
                self.result.tokenize_seconds += time.perf_counter() - started
                self._generate_and_publish(work)
                return self._published(shard, own)
        finally:
            self._release(shard)

    def _release_all(self) -> None:
        try:
            self.store.release_all()
        except OSError as e:  # a full disk: the claims expire by their lease
            log.warning("could not release this worker's claims (%s)", e)

    def _release(self, shard: Shard) -> None:
        try:
            self.store.release(shard.index)
        except OSError as e:  # a full disk: the claim expires by its lease; keep the first error
            log.warning("could not release the claim on %s (%s)", shard.name, e)

    def _trusted(self, shard: Shard, rows: Rows | None) -> bool:
        """Whether a finished shard of this worker's share can be skipped.

        A damaged one is moved aside (False: generate it again).

        Raises:
            ResumeError: the shard is another config's, or its input rows changed.
        """
        path = self.out_dir / shard.name
        fingerprint = self.meta["fingerprint"]
        try:
            reason = verify_shard(path, fingerprint, None, self.samples)
            if reason is None:
                recorded = shard_metadata(path)["shard"].get("digest")
            elif reason_kind(reason) == OTHER_CONFIG:
                recorded = shard_metadata(path).get("fingerprint_parts", {})
        except FileNotFoundError:
            return False  # another worker moved it aside meanwhile
        if reason is None:
            if recorded != self.inputs.digest(shard, rows):
                raise self.inputs.changed_rows_error(path, shard, rows)
            self.result.resumed += 1
            return True
        if reason_kind(reason) == OTHER_CONFIG:
            parts = self.meta["fingerprint_parts"]
            raise manifest.refuse(self.out_dir, path.name, recorded, parts)
        moved = quarantine(path)
        if moved is not None:
            print(
                f"batchgen: {path.name} is damaged ({reason}); moved to {moved.name}, "
                "generating it again",
                flush=True,
            )
        return False

    def _results(self, item: ShardWork) -> tuple[dict, list, int, float]:
        """Samples of every record (finished batches of earlier attempts reused), the rows that
        failed, the pads computed and the seconds spent generating."""
        shard = item.shard
        identity = {"fingerprint": self.meta["fingerprint"], "digest": item.digest}
        samples = {
            r.index: (r.sampling or self.plan.sampling).num_return_sequences for r in item.records
        }
        results = checkpoints.load(self.out_dir, shard.index, identity, samples)
        todo = [r for r in item.records if r.index not in results]
        self.result.kept_rows = len(results)
        self.progress.update(
            len(results), sum(s.completion_tokens for v in results.values() for s in v)
        )
        if not todo:
            return results, [], 0, 0.0

        def persist(batch: list) -> None:
            self.result.kept_rows += len(batch)
            if self.result.kept_rows < len(item.records):  # the last batch: publish instead
                checkpoints.save(self.out_dir, shard.index, identity, batch)
            self.watchdog.beat()

        if self.session.batcher is None:
            self.progress.phase("loading the model")
            with self.watchdog.paused():  # loading the model is no stall
                engine = self.session.runner(self.plan).engine
            engine.on_step = self._stepped
            engine.on_prefill = self._prefilled
        engine = self.session.runner(self.plan).engine
        padded_before = engine.padded_tokens
        started = time.perf_counter()
        fresh, failed = self.session.generate(todo, self.plan, self._rows_done, persist)
        seconds = time.perf_counter() - started
        padded = engine.padded_tokens - padded_before
        return {**results, **fresh}, failed, padded, seconds

    def _prefilled(self) -> None:
        self.watchdog.beat()
        self.progress.phase("prefilling")

    def _stepped(self, tokens: int) -> None:
        self.watchdog.beat()
        self.progress.step(tokens)

    def _rows_done(self, rows: int, tokens: int) -> None:
        self.watchdog.beat()
        self.progress.update(rows, tokens)

    def _shard_meta(self, item: ShardWork, totals: Totals, failed: list, seconds: float) -> dict:
        """The footer metadata of a shard: the run's, plus what this shard holds and who made it."""
        shard = item.shard
        return {
            **self.meta,
            "shard": {
                "index": shard.index,
                "start": shard.start,
                "stop": shard.stop,
                "digest": item.digest,
                "totals": totals.to_dict(),
                "skipped": [{"id": s.id, "reason": s.reason} for s in item.skipped],
                "failed": [{"id": s.id, "reason": s.reason} for s in failed],
                "timing": {"finished_at": time.time(), "generate_seconds": seconds},
                "worker": {
                    "rank": self.worker.rank,
                    "world_size": self.worker.world_size,
                    "owner": self.store.owner,
                },
            },
        }

    def _generate_and_publish(self, item: ShardWork) -> None:
        shard = item.shard
        results, failed, padded, generate_seconds = self._results(item)
        rows, totals = shard_rows(item.records, results, self.plan.output)
        totals.failed = len(failed)
        totals.skipped = len(item.skipped)
        totals.padded_tokens = padded
        self.progress.update(len(item.skipped), 0)
        self.counted.add(shard.index)
        if not self.store.owns(shard.index):
            self.store.renew()  # a late heartbeat leaves the claim ours but not yet publishable
        if not self.store.owns(shard.index):
            log.warning("lost the claim on %s while generating it; dropping our copy", shard.name)
            return
        shard_meta = self._shard_meta(item, totals, failed, generate_seconds)
        started = time.perf_counter()
        schema = output_schema(self.settings.kept_types, shard_meta, self.plan.output.columns)
        if write_shard(self.out_dir, shard.name, rows, schema, self.settings.compression):
            self.result.totals.add(totals)
        checkpoints.clear(self.out_dir, shard.index)
        self.result.kept_rows = 0
        self.result.generate_seconds += generate_seconds
        self.result.write_seconds += time.perf_counter() - started
