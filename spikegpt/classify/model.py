"""A SpikeGPT sentence classifier: a linear head on pooled features of the final LayerNorm.

    h = LN_out(x_t)  for the real tokens t = 1..n of a sentence    (SpikeGPT.features)
    mean:  f = (1/n) sum_{t<=n} h_t        last:  f = h_n          (for a recurrent model, the sentence)
    p(y | sentence) = softmax(W dropout(f) + b)

Batches are right-padded: the model is causal, so pad tokens after position n never reach h_1..h_n,
and pooling reads positions <= n only (the mean through a running sum, the same additions in the same
order whatever the padding).  A sentence's logits alone and in a padded batch agree up to the
rounding of batched matrix products (a few 1e-8 in fp32).  A classifier checkpoint is one ``torch.save`` file of plain dicts
and tensors (``weights_only=True`` loads it), label names and tokenizer inside.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, versions
from ..config import ModelConfig
from ..fileio import atomic_write
from ..model import SpikeGPT
from ..tokenizer import tokenizer_from_dict

POOLS = ("mean", "last")
FORMAT = "spikegpt-classifier"
VERSION = 1
FILE = "classifier.pt"
PAD_ID = 0


def pool(h: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C) features of the real tokens of right-padded ``h`` (B, T, C), ``lengths`` (B,) >= 1."""
    last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
    if how == "last":
        return h.gather(1, last)[:, 0]
    if how == "mean":
        return h.cumsum(1).gather(1, last)[:, 0] / lengths.view(-1, 1).to(h.dtype)
    raise ValueError(f"pool must be one of {POOLS}, got {how!r}")


class SentenceClassifier(nn.Module):
    def __init__(self, lm: SpikeGPT, labels: list[str], pool: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.lm, self.labels, self.pool = lm, list(labels), pool
        self.tokenizer = lm.tokenizer
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(lm.config.n_embd, len(labels))

    def forward(self, idx, lengths):
        """Logits (B, n_classes) for right-padded token ids ``idx`` (B, T) of ``lengths`` (B,)."""
        h, _ = self.lm.features(idx)
        return self.classifier(self.dropout(pool(h.float(), lengths, self.pool)))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; characters outside a char vocabulary become its unknown id."""
        tok = self.tokenizer
        if tok.kind == "char" and tok.unk_id is not None:
            return tok.encode(text, errors="unk")
        return tok.encode(text)

    def head_parameters(self):
        return list(self.classifier.parameters())

    def lm_parameters(self):
        return [p for n, p in self.lm.named_parameters() if not n.startswith("head.")]

    def state(self, extra: dict | None = None) -> dict:
        """The checkpoint dict (plain values and CPU tensors only)."""
        return {"format": FORMAT, "version": VERSION, "labels": self.labels, "pool": self.pool,
                "dropout": self.dropout.p, "model_config": self.lm.config.to_dict(),
                "model": {k: v.detach().cpu() for k, v in self.lm.state_dict().items()},
                "classifier": {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()},
                "tokenizer": self.tokenizer.to_dict(), "versions": versions(), **(extra or {})}


def save_classifier(clf: SentenceClassifier, out_dir, extra: dict | None = None) -> Path:
    """Write ``out_dir/classifier.pt`` atomically; returns its path."""
    path = Path(out_dir) / FILE
    state = clf.state(extra)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_classifier(path, device="cpu") -> tuple[SentenceClassifier, dict]:
    """(classifier in eval mode, its checkpoint dict) from a classifier file or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass the --out-dir of a classify run or its {FILE}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable classifier checkpoint ({type(e).__name__}); "
                              "pass the file a classify run wrote") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spikegpt classifier (a language-model checkpoint? "
                              "fine-tune it with python -m spikegpt.classify train --init-from)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has classifier format version {ckpt['version']}, newer than this "
                              f"spikegpt understands ({VERSION}): upgrade spikegpt")
    lm = SpikeGPT(ModelConfig.from_dict(ckpt["model_config"]))
    lm.load_state_dict(ckpt["model"])
    lm.tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    clf = SentenceClassifier(lm, ckpt["labels"], ckpt["pool"], ckpt["dropout"])
    clf.classifier.load_state_dict(ckpt["classifier"])
    return clf.to(device).eval(), ckpt


VOCABS = ("byte", "char", "bpe")


def scratch_lm(train_examples, vocab: str = "byte", bpe_vocab_size: int = 4096, **config) -> SpikeGPT:
    """A freshly initialised language model to train on the task alone: ``vocab`` is ``byte`` (256
    ids), ``char`` (the characters of the training sentences, plus an unknown id) or ``bpe`` (a
    byte-level BPE of ``bpe_vocab_size`` tokens trained on the training sentences only, so no dev or
    test sentence shapes it); ``config`` holds ModelConfig fields."""
    from ..tokenizer import ByteTokenizer, CharTokenizer, train_bpe

    if vocab == "byte":
        tok = ByteTokenizer()
    elif vocab == "char":
        tok = CharTokenizer.from_text("".join(e.text for e in train_examples))
    elif vocab == "bpe":
        tok = train_bpe((e.text for e in train_examples), bpe_vocab_size)
    else:
        raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}")
    lm = SpikeGPT(ModelConfig(**{**config, "vocab_size": tok.vocab_size}))
    lm.tokenizer = tok
    return lm
