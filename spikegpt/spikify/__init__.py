"""Saliency-based spiking of a trained model (SpikeLLM's Optimal Brain Spiking): the input of every
linear layer becomes a spike train.

* :mod:`.encoding` -- the neuron, the quantization it realises, :class:`InputEncoder` (the module
  every ``spikegpt.model.Linear`` applies to its input) and :class:`SpikifyConfig`;
* :mod:`.saliency` -- calibration statistics and the per-channel saliency scores;
* :mod:`.convert` -- :func:`spikify` a model, fine-tune its thresholds, read/write converted checkpoints;
* :mod:`.sweep` -- the experiment grid and its report;
* ``python -m spikegpt.spikify`` -- the command line (:mod:`.__main__`).

This package's ``__init__`` imports nothing, so that ``spikegpt.model`` can import :mod:`.encoding`.
"""
