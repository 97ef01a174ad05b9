"""SpikeGPT: spiking RWKV language models, trained and sampled in PyTorch."""
from .config import ModelConfig, TrainConfig, PRESETS
from .model import SpikeGPT
from .checkpoint import load, from_reference, CheckpointError
from .version import __version__

__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "SpikeGPT", "load", "from_reference", "CheckpointError",
           "__version__"]
