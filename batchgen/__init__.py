"""batchgen: batch offline LLM generation into resumable Parquet shards."""

__version__ = "0.1.0"
