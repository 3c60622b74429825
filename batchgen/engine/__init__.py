"""Engines: turn batches of tokenized prompts into samples (static and continuous batching,
chunked prefill, batch-invariant sampling, batch planning and the out-of-memory split).
Imports ``inputs`` and the base modules."""
