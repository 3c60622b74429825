"""The job: one worker's run from a typed config to published shards, in call order (``run``),
the shard loop it drives, each shard's inputs, and the session both it and ``Generator`` use."""
