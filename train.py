#!/usr/bin/env python
"""Train a SpikeGPT model: ``python train.py --help``."""
import sys

from spikegpt.train import main

if __name__ == "__main__":
    sys.exit(main())
