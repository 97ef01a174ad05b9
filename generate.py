"""Sample from a SpikeGPT checkpoint: ``python generate.py --ckpt RUN_DIR --prompt "..."``.

See ``spikegpt/generate.py`` (``python generate.py --help``)."""
import sys

from spikegpt.generate import main

if __name__ == "__main__":
    sys.exit(main())
