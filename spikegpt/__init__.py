"""SpikeGPT: spiking RWKV language models, trained and sampled in PyTorch."""
from .config import ModelConfig, TrainConfig, PRESETS
from .model import SpikeGPT

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "SpikeGPT", "__version__"]
