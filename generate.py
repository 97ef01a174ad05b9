"""Sample from a SpikeGPT checkpoint: ``python generate.py --ckpt RUN_DIR --prompt "..."``.

See ``spikegpt/generate.py`` (``python generate.py --help``)."""
import sys

try:
    from spikegpt.generate import main
except KeyboardInterrupt:  # Ctrl-C while torch loads
    sys.exit(130)
except ModuleNotFoundError as e:
    sys.exit(f"error: {e.name} is not installed: run pip install -e . in this directory (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
