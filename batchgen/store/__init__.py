"""The output folder: its file names, shard files and their footers, the run record and
fingerprint, verification, the summary, and the one reader of a folder's state (``folder``).
Imports ``inputs`` and ``engine`` types at most."""
