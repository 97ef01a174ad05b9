#!/usr/bin/env python
"""Train a SpikeGPT model: ``python train.py --help``."""
import sys

try:
    from spikegpt.train import main
except KeyboardInterrupt:  # Ctrl-C while torch loads
    sys.exit(130)
except ModuleNotFoundError as e:
    sys.exit(f"error: {e.name} is not installed: run pip install -e . in this directory (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
