"""The output folder: its file names, shard files and their footers, the run record and
fingerprint, verification and the summary. Imports ``inputs`` and ``engine`` types at most."""
