"""Triton kernels for SpikeGPT's sequence operations, installed as ``spikegpt.kernels``.

``wkv(w, u, k, v, state=None) -> (y, (p, q, o))``,
``lif(x, v0=None, tau=2.0, v_threshold=1.0, alpha=2.0) -> (spikes, v_last)`` and
``gif(x, v0=None, theta=1.0, tau=2.0, levels=1, bipolar=False, reset="hard", surrogate="atan", alpha=2.0)
-> (y, v_last)`` have the contracts of the PyTorch references in ``spikegpt.ops`` and are registered
as ``torch.library`` custom ops (``spikegpt::wkv_forward`` / ``wkv_backward`` / ``lif_forward`` /
``lif_backward`` / ``gif_forward`` / ``gif_backward``) so that
``torch.compile`` treats them as opaque nodes instead of breaking the graph.

Importing this package raises ImportError when Triton is not installed; ``spikegpt.ops`` relies on
that to fall back to the references.  Without a GPU the kernels run only in Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is first imported).
"""
import triton  # noqa: F401  (ImportError here means: no Triton)

from .gif import gif
from .lif import lif
from .wkv import wkv

__all__ = ["wkv", "lif", "gif"]
