"""Sentence classification with SpikeGPT: ``python -m spikegpt.classify`` (see ``__main__``)."""
from .data import FORMATS, Example, read_examples
from .model import SentenceClassifier, load_classifier, save_classifier, scratch_lm
from .train import ClassifyConfig, cross_validate, run_split

__all__ = ["FORMATS", "Example", "read_examples", "SentenceClassifier", "load_classifier", "save_classifier",
           "scratch_lm", "ClassifyConfig", "cross_validate", "run_split"]
