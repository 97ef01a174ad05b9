"""SpikeGPT models in EleutherAI's LM Evaluation Harness (``pip install -e ".[eval]"``).

Importing this module registers the lm-eval model type ``spikegpt``; ``python -m spikegpt.harness``
takes lm-eval's own command line (same arguments, same output files) with the model registered::

    python -m spikegpt.harness --model spikegpt --model_args pretrained=runs/tiny \\
        --tasks wikitext --output_path results/

lm-eval (0.4.13) discovers no out-of-tree models (no entry-point group), so its bare ``lm_eval``
command does not know ``spikegpt``; from Python, import this module before
``lm_eval.simple_evaluate(model="spikegpt", ...)``.

``--model_args`` keys: ``pretrained`` (our checkpoint file or run directory), or ``reference`` +
``reference_config`` (a reference state dict and its config JSON, with ``binary_embedding`` and
``v_threshold`` when they differ from our defaults); ``tokenizer`` ('byte', a tokenizer.json or a
``Tokenizer.to_dict()`` JSON; default the checkpoint's); ``device`` (default auto), ``batch_size``,
``dtype`` (fp32, the default and what ``spikegpt.evaluate`` computes in; bf16 or fp16 autocast; auto =
bf16 on GPUs that support it), ``kernels`` (auto, triton, torch),
``window`` (tokens per forward pass, default the model's ctx_len) and ``max_length``.

Context.  The model is an RNN, so by default (``max_length`` unset) nothing is ever truncated:

* ``loglikelihood``: each distinct context runs once through the parallel path, and its final state
  and last log-probabilities score every continuation that shares it (the choices of a
  multiple-choice question); a continuation of ``n`` tokens costs ``n - 1`` more positions.
* ``loglikelihood_rolling``: the document runs from the start token in consecutive windows of
  ``window`` tokens, the state carried from each into the next, every token predicted once from the
  whole document before it; this is ``python -m spikegpt.evaluate --streams 1`` on the same text
  (the start token followed by the document) with the same ``window``.
* ``generate_until``: the prompt is prefilled once, then :func:`spikegpt.generate.generate` steps the
  recurrent decoder.

With ``max_length = L`` every request sees at most ``L`` tokens of context from the zero state, the
protocol Transformer results are reported under: rolling documents are cut into lm-eval's rolling
windows (``get_rolling_token_windows`` with one token of context, ``make_disjoint_window``; the last
window is filled up with earlier tokens), ``loglikelihood`` keeps the last ``L + 1`` tokens of context
plus continuation, and prompts are cut to their last ``L - max_gen_toks`` tokens.

Tokens.  Context and continuation are encoded as lm-eval's ``TemplateLM`` does (trailing spaces of the
context move to the continuation; the continuation's tokens are those of ``context + continuation``
after the context's), which for byte and char vocabularies is just encoding each separately.  An
empty context is the model's start token (:func:`spikegpt.generate.start_token`), and the whole
continuation is scored.  Char vocabularies map characters outside the vocabulary to the unknown id,
as the data preparation does.  Word and byte counts (``word_perplexity``, ``bits_per_byte``) are
lm-eval's, counted on the document text, whatever the vocabulary.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from . import ops
from .cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, debugging, device_from, load_model
from .generate import generate, start_token, truncate_at_stop

__all__ = ["SpikeGPTLM", "main"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _positive(key, value, hint=""):
    """A positive integer ``--model_args`` value (lm-eval passes numbers, or strings from --batch_size)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise UserError(f"{key}={value!r}: pass a positive integer {hint}".rstrip())
    return number


class SpikeGPTLM(TemplateLM):
    """A SpikeGPT checkpoint as an lm-eval model (see the module docstring)."""

    def __init__(self, pretrained=None, reference=None, reference_config=None, tokenizer=None,
                 binary_embedding=None, v_threshold=None, device="auto", batch_size=1, dtype="fp32",
                 kernels="auto", window=None, max_length=None, max_batch_size=None, model=None):
        super().__init__()
        del max_batch_size  # lm-eval passes it for batch_size=auto, which this model does not take
        self.batch_size = _positive("batch_size", batch_size, "(no 'auto')")
        self._max_length = None if max_length is None else _positive("max_length", max_length)
        window = None if window is None else _positive("window", window)
        if kernels not in ops.BACKENDS:
            raise UserError(f"kernels={kernels!r}: choose one of {', '.join(ops.BACKENDS)}")
        ops.set_backend(kernels)
        self._device = self._resolve_device(device)
        if dtype == "auto":  # as training's: bf16 on GPUs that support it
            dtype = "bf16" if self._device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if dtype not in DTYPES:
            raise UserError(f"dtype={dtype!r}: choose one of auto, {', '.join(DTYPES)}")
        if dtype == "fp16" and self._device.type != "cuda":
            raise UserError("dtype=fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
        self.dtype = dtype
        if model is None:
            if pretrained is None and reference is None:
                raise UserError("name the model in --model_args: pretrained=CHECKPOINT_OR_RUN_DIR, or "
                                "reference=PTH,reference_config=JSON")
            model = load_model(SimpleNamespace(
                ckpt=pretrained, reference=reference, reference_config=reference_config, tokenizer=tokenizer,
                binary_embedding=binary_embedding, v_threshold=v_threshold), self._device)
        self.model = model.to(self._device).eval()
        self.tokenizer = model.tokenizer
        self.window = window or self._max_length or self.model.config.ctx_len
        self.start = start_token(self.tokenizer, self.model.config.vocab_size)

    # ---------------------------------------------------------------------------------------------
    # Construction from lm-eval's arguments
    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(device):
        """``device`` from --model_args or lm-eval's --device (whose default is cuda:0): a CUDA device
        on a machine without one falls back to the CPU, as lm-eval's HF model does."""
        device = "auto" if device is None else str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s is not available: using the CPU", device)
            device = "cpu"
        return device_from(device)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """Like lm-eval's, except that a key in ``--model_args`` wins over lm-eval's own --batch_size /
        --device defaults instead of clashing with them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # ---------------------------------------------------------------------------------------------
    # TemplateLM's tokenizer interface
    # ---------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.start

    @property
    def max_length(self):
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"spikegpt-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string, add_special_tokens=None, **kwargs) -> list[int]:
        if getattr(self.tokenizer, "unk_id", None) is not None and self.tokenizer.kind == "char":
            return self.tokenizer.encode(string, errors="unk")
        return self.tokenizer.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def get_model_info(self) -> dict:
        c = self.model.config
        return {"model_num_parameters": self.model.num_params(), "model_vocab": f"{self.tokenizer.kind} {c.vocab_size}",
                "model_context": "unbounded (recurrent state)" if self._max_length is None
                else f"{self._max_length} tokens from the zero state", "model_window": self.window}

    # ---------------------------------------------------------------------------------------------
    # The recurrent core
    # ---------------------------------------------------------------------------------------------
    def _autocast(self):
        if DTYPES[self.dtype] is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=DTYPES[self.dtype])

    @torch.no_grad()
    def _advance(self, rows, state, targets=None):
        """Run each token list ``rows[b]`` (non-empty) from ``state[:, :, b]``, in place.

        All rows move in lockstep through chunks that end at multiples of ``window`` (as
        ``spikegpt.evaluate`` cuts its windows) or where the shortest unfinished row ends, so no
        position is padded.  Returns the log-probabilities after each row's last token (B, V), and
        with ``targets`` (one list per row, as long as the row) the summed log-probability of the
        targets (float64, (B,)) and whether each target was the argmax at its position ((B,) bool).
        """
        B, V = len(rows), self.model.config.vocab_size
        lengths = [len(r) for r in rows]
        last = torch.empty(B, V, device=self._device)
        sums = torch.zeros(B, dtype=torch.float64, device=self._device)
        greedy = torch.ones(B, dtype=torch.bool, device=self._device)
        active, pos = list(range(B)), 0
        while active:
            t = min(self.window - pos % self.window, min(lengths[b] for b in active) - pos)
            sel = torch.tensor(active, device=self._device)
            idx = torch.tensor([rows[b][pos:pos + t] for b in active], device=self._device)
            with self._autocast():
                logits, new_state = self.model(idx, state=state[:, :, sel], return_state=True)
            state[:, :, sel] = new_state.to(state.dtype)
            logp = torch.log_softmax(logits.float(), dim=-1)
            if targets is not None:
                tgt = torch.tensor([targets[b][pos:pos + t] for b in active], device=self._device)
                sums[sel] += logp.gather(-1, tgt[..., None])[..., 0].double().sum(1)
                greedy[sel] &= (logp.argmax(-1) == tgt).all(1)
            pos += t
            done = [j for j, b in enumerate(active) if lengths[b] == pos]
            last[sel[done]] = logp[done, -1]
            active = [b for b in active if lengths[b] > pos]
        return last, sums, greedy

    def _batches(self, items, desc):
        """``items`` in slices of ``batch_size``, with a progress bar."""
        with tqdm(total=len(items), desc=desc, unit="seq") as bar:
            for k in range(0, len(items), self.batch_size):
                yield items[k:k + self.batch_size]
                bar.update(len(items[k:k + self.batch_size]))

    def _fit(self, context, continuation):
        """With ``max_length``: the last ``max_length + 1`` tokens of context + continuation (as
        lm-eval's HF model keeps them), split back into context and continuation."""
        if self._max_length is None:
            return context, continuation
        whole = (context + continuation)[-(self._max_length + 1):]
        n_cont = min(len(continuation), len(whole) - 1)
        return whole[:len(whole) - n_cont], whole[len(whole) - n_cont:]

    def _score(self, pairs) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for token-id pairs (context non-empty).

        Contexts are run once each, longest first, ``batch_size`` at a time; then every continuation
        of those contexts runs from a copy of its context's state."""
        pairs = [self._fit(list(c), list(x)) for c, x in pairs]
        by_context = defaultdict(list)
        for i, (c, _) in enumerate(pairs):
            by_context[tuple(c)].append(i)
        contexts = sorted(by_context, key=len, reverse=True)
        out = [None] * len(pairs)
        for batch in self._batches(contexts, "spikegpt contexts"):
            state = self.model.initial_state(len(batch), self._device)
            last, _, _ = self._advance([list(c) for c in batch], state)
            members = sorted(((j, i) for j, c in enumerate(batch) for i in by_context[c]),
                             key=lambda m: -len(pairs[m[1]][1]))
            for a in range(0, len(members), self.batch_size):
                chunk = members[a:a + self.batch_size]
                self._score_continuations(chunk, pairs, last, state, out)
        return out

    def _score_continuations(self, chunk, pairs, last, ctx_state, out):
        """Score ``(context row j, request i)`` pairs: the first token from the context's last
        log-probabilities, the rest by running the continuation from the context's state."""
        rows = torch.tensor([j for j, _ in chunk], device=self._device)
        conts = [pairs[i][1] for _, i in chunk]
        nonempty = torch.tensor([bool(c) for c in conts], device=self._device)
        first = torch.tensor([c[0] if c else 0 for c in conts], device=self._device)
        sums = torch.where(nonempty, last[rows, first].double(), 0.0)
        greedy = ~nonempty | (last[rows].argmax(-1) == first)
        longer = [n for n, c in enumerate(conts) if len(c) > 1]
        if longer:
            state = ctx_state[:, :, rows[longer]]
            _, s, g = self._advance([conts[n][:-1] for n in longer], state, [conts[n][1:] for n in longer])
            sums[longer] += s
            greedy[longer] &= g
        for (_, i), ll, g in zip(chunk, sums.tolist(), greedy.tolist()):
            out[i] = (ll, g)

    # ---------------------------------------------------------------------------------------------
    # lm-eval's three request types
    # ---------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                pairs.append(([self.start], self.tok_encode(continuation)))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self._loglikelihood_tokens([(r.args, c, x) for r, (c, x) in zip(requests, pairs)])

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(c, x) for _, c, x in requests])
        for (args, _, _), result in zip(requests, results):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(r.args[0]) for r in requests]
        if self._max_length is None:
            totals = self._rolling_carried(docs)
        else:
            totals = self._rolling_windows(docs)
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def _rolling_carried(self, docs) -> list[float]:
        """Each document from the start token, state carried across windows, ``batch_size`` at once."""
        totals = [0.0] * len(docs)
        order = sorted((i for i, d in enumerate(docs) if d), key=lambda i: -len(docs[i]))
        for batch in self._batches(order, "spikegpt documents"):
            state = self.model.initial_state(len(batch), self._device)
            _, sums, _ = self._advance([[self.start] + docs[i][:-1] for i in batch], state,
                                       [docs[i] for i in batch])
            for i, s in zip(batch, sums.tolist()):
                totals[i] = s
        return totals

    def _rolling_windows(self, docs) -> list[float]:
        """lm-eval's rolling windows of ``max_length`` tokens, each from the zero state."""
        windows, owner = [], []
        for i, doc in enumerate(docs):
            for w in lm_utils.get_rolling_token_windows(doc, self.start, self._max_length, 1):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(docs)
        for i, (ll, _) in zip(owner, self._score(windows)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)
        for i, r in enumerate(requests):
            groups[repr(sorted(r.args[1].items()))].append(i)
        out = [None] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if self.tokenizer.eot_id is not None:
                until.append(self.tok_decode([self.tokenizer.eot_id]))
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 1.0))
            if not kwargs.pop("do_sample", False):
                temperature = 0.0  # greedy, as lm-eval means without do_sample
            top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
            if kwargs:
                log.warning("generate_until: ignoring generation arguments %s", sorted(kwargs))
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for batch in self._batches(members, "spikegpt generation"):
                texts = self._generate([requests[i].args[0] for i in batch], until, max_gen, temperature,
                                       top_k, top_p)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts, until, max_gen, temperature, top_k, top_p) -> list[str]:
        prompts = [self.tok_encode(c) or [self.start] for c in contexts]
        if self._max_length is not None:
            keep = max(1, self._max_length - max_gen)
            prompts = [p[-keep:] for p in prompts]
        state = self.model.initial_state(len(prompts), self._device)
        last, _, _ = self._advance(prompts, state)
        ids = generate(self.model, [], max_gen, temperature, top_k, top_p, stop=until, tokenizer=self.tokenizer,
                       start=(last, state))
        return [truncate_at_stop(self.tok_decode(s), until)[0] for s in ids]


if __name__ != "__main__":  # under python -m, the import in the last lines registers the class
    register_model("spikegpt")(SpikeGPTLM)


def main(argv=None) -> int:
    """``python -m spikegpt.harness <lm_eval arguments>``: lm-eval's command line, ``spikegpt`` registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or debugging()  # our --debug, not lm-eval's: show tracebacks
    saved, sys.argv = sys.argv, ["lm_eval", *(a for a in argv if a != "--debug")]
    try:
        cli_evaluate()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from spikegpt.harness import main as _main  # registers spikegpt.harness.SpikeGPTLM

    sys.exit(_main())
