"""``python -m batchgen [hydra overrides]``."""

from batchgen.cli import main

if __name__ == "__main__":
    main()
