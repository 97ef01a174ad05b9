"""Sampling from a SpikeGPT model: library functions and the ``generate.py`` command line.

The prompt is run through the parallel path once (prefill, ``model(idx, return_state=True)``); then the
model runs as an RNN, one :meth:`SpikeGPT.step` per generated token (``spikegpt.recurrent``), with
constant memory and work per token.

Start token.  An empty prompt starts from the model's start token: the tokenizer's ``eot_id``
(``<|endoftext|>`` for GPT-NeoX BPE) when it has one, else ``"\\n"`` (byte 10) for the byte tokenizer and
id 0 for a char tokenizer (its smallest code point, ``"\\n"`` for enwik8).  The start token is fed to
the model but not printed.

Examples::

    python generate.py --ckpt runs/tiny --prompt "The " --max-new-tokens 200 --temperature 0.8 --top-p 0.95
    python generate.py --reference SpikeGPT-216M.pth --reference-config 216m.json \\
        --tokenizer 20B_tokenizer.json --prompt "In a shocking finding" --stream

Reference checkpoints do not record whether the model binarised its embedding or which LIF threshold
it used: ``--binary-embedding/--no-binary-embedding`` and ``--v-threshold`` set them.  To pick them,
evaluate each candidate on a held-out text (``python -m spikegpt.evaluate``) and keep the one with the
lowest loss; the wrong choice gives a much worse perplexity.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

from . import cli

__all__ = ["generate", "GenerationInterrupted", "filter_logits", "sample_next", "StreamDecoder", "start_token",
           "main", "truncate_at_stop"]


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` (B, V) with everything outside the top-k / nucleus set to -inf.

    top-k keeps the k largest logits (all ties of the k-th value kept); top-p keeps the smallest set of
    most probable tokens whose probability reaches ``top_p`` (always at least the most probable one).
    Both may be given (top-k first, then top-p on what is left)."""
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from ``logits`` (B, V): greedy for ``temperature == 0``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    device = generator.device if generator is not None else logits.device
    logits = filter_logits(logits.to(device).float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns token ids into text incrementally, never emitting half of a character.

    Byte vocabularies go through an incremental UTF-8 decoder (a character split across tokens is
    held back until complete).  Other tokenizers (BPE, char) are decoded over a short window of recent
    ids, emitting the new suffix only when it does not end in U+FFFD (a byte-level BPE token that
    stops inside a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.kind = getattr(tokenizer, "kind", None)
        if self.kind == "byte":
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.kind == "byte":
            return self._utf8.decode(bytes([token_id]))
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        """Whatever is still held back (incomplete characters become U+FFFD)."""
        if self.kind == "byte":
            return self._utf8.decode(b"", final=True)
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


class _TextStream:
    """A sample's text as it grows: complete characters only, cut before the first stop string.

    Text that could be the beginning of a stop string is held back until it is known not to be."""

    def __init__(self, tokenizer, stop):
        self.dec = StreamDecoder(tokenizer)
        self.stop = stop
        self.pending = ""

    def push(self, token_id) -> tuple[str, bool]:
        self.pending += self.dec.push(token_id)
        text, found = truncate_at_stop(self.pending, self.stop)
        if found:
            self.pending = ""
            return text, True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        out, self.pending = text[:len(text) - keep], text[len(text) - keep:]
        return out, False

    def flush(self) -> str:
        text, _ = truncate_at_stop(self.pending + self.dec.flush(), self.stop)
        self.pending = ""
        return text


def truncate_at_stop(text: str, stop) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found."""
    cut = min((i for s in stop or () if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def start_token(tokenizer, vocab_size: int | None = None) -> int:
    """The token an empty prompt starts from (see the module docstring); without a tokenizer, byte 10
    for a 256-symbol model (or unknown vocabulary), else id 0."""
    if tokenizer is not None and getattr(tokenizer, "eot_id", None) is not None:
        return int(tokenizer.eot_id)
    if getattr(tokenizer, "kind", None) == "byte" or (tokenizer is None and vocab_size in (None, 256)):
        return 10
    return 0


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`generate`; ``samples`` holds the ids generated until then."""

    def __init__(self, samples: list[list[int]]):
        super().__init__("generation interrupted")
        self.samples = samples


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, stop=None,
             num_samples: int = 1, tokenizer=None, on_text=None, decoder=None, start=None) -> list[list[int]]:
    """Sample ``num_samples`` continuations of ``prompt_ids`` (a list of ids; empty = the start token).

    Returns one list of new token ids per sample.  ``stop``: strings; a sample ends at the token that
    completes one of them (decoded with ``tokenizer``, default ``model.tokenizer``; use
    :func:`truncate_at_stop` on the decoded text to drop it).  ``on_text(sample, text)`` is called with
    each complete piece of text as it is produced (streaming).  ``decoder``: a
    ``spikegpt.recurrent.RecurrentDecoder`` to step with (e.g. bf16 weights); default ``model.step``.
    ``start``: ``(logits (B, V), state)`` of B prompts the caller has already run (the logits after
    each one's last token, e.g. log-probabilities); it replaces ``prompt_ids`` and ``num_samples``.
    The model runs in eval mode (restored afterwards)."""
    model = _unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    stop = [s for s in (stop or []) if s]
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=, or set model.tokenizer)")
    V = model.config.vocab_size
    prompt_ids = [int(i) for i in prompt_ids] or [start_token(tokenizer, V)]
    bad = [i for i in prompt_ids if not 0 <= i < V]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary of {V}")
    was_training = model.training
    model.eval()
    try:
        device = model.head.weight.device
        step = decoder.step if decoder is not None else model.step
        if start is None:
            idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            logits, state = model(idx, return_state=True)
            logits = logits[:, -1].float().expand(num_samples, -1)
            state = state.expand(-1, -1, num_samples, -1).contiguous()
        else:
            logits, state = start[0].float(), start[1]
            num_samples = logits.shape[0]
        out = [[] for _ in range(num_samples)]
        streams = [_TextStream(tokenizer, stop) for _ in range(num_samples)] if (stop or on_text) else None
        done = [False] * num_samples
        try:
            for n in range(max_new_tokens):
                tokens = sample_next(logits, temperature, top_k, top_p, generator)
                for b, t in enumerate(tokens.tolist()):
                    if done[b]:
                        continue
                    out[b].append(t)
                    if streams is not None:
                        piece, done[b] = streams[b].push(t)
                        if on_text is not None and piece:
                            on_text(b, piece)
                if all(done) or n == max_new_tokens - 1:
                    break
                logits, state = step(tokens.to(device), state)
        except KeyboardInterrupt:
            raise GenerationInterrupted(out) from None
        if on_text is not None:
            for b in range(num_samples):
                if not done[b] and (rest := streams[b].flush()):
                    on_text(b, rest)
        return out
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser(
        "generate.py", "Sample text from a SpikeGPT checkpoint (recurrent mode).",
        epilog="An empty prompt starts from the start token: <|endoftext|> if the vocabulary has one, "
               "else '\\n' for bytes, id 0 for chars.")
    cli.add_model_args(p)
    g = p.add_argument_group("prompt and sampling")
    g.add_argument("--prompt", default=None, help="prompt text (default: empty = start token)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file (UTF-8)")
    g.add_argument("--max-new-tokens", type=cli.nonneg_int, default=200)
    g.add_argument("--temperature", type=cli.nonneg_float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=cli.positive_int, default=None)
    g.add_argument("--top-p", type=cli.probability, default=None)
    g.add_argument("--seed", type=cli.nonneg_int, default=None, help="same seed, same text (on the same machine)")
    g.add_argument("--num-samples", type=cli.positive_int, default=1, help="samples, generated as one batch")
    g.add_argument("--stop", action="append", default=[], help="stop a sample at this string (repeatable)")
    r = p.add_argument_group("runtime")
    cli.add_device_arg(r)
    r.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    r.add_argument("--spike-stats", action="store_true", help="per-layer firing rates of the generated tokens")
    cli.add_kernels_arg(r)
    r.add_argument("--bf16-weights", action="store_true",
                   help="decode with bf16 copies of the weight matrices (faster on CPU; approximate)")
    r.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"),
                   help="capture the recurrent step in a CUDA graph (one launch per token instead of ~650): "
                        "auto = on a CUDA device, falling back to uncaptured steps where capture fails; "
                        "on = the same, but an error on a CPU and a warning on a fallback")
    r.add_argument("--exact-batches", action="store_true",
                   help="--num-samples > 1 on a CPU: use the parallel path's own BLAS products (bitwise "
                        "equal to it on one token, slower) instead of oneDNN's")
    cli.add_threads_arg(r)
    return p


def _encode_prompt(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:  # a char vocabulary without some of the prompt's characters
        raise cli.UserError(f"the prompt cannot be encoded: {str(e).split('; ')[0]}; remove those characters "
                            "from the prompt") from None


def _graph_note(decoder, device) -> str:
    """How a CUDA model's steps ran, for the closing line (nothing on a CPU)."""
    if device.type != "cuda":
        return ""
    if decoder.graph_fallback is None:
        return ", CUDA graph" if decoder.graph_captures else ""
    return f", without CUDA graph: {decoder.graph_fallback}"


def run(args, out=None, err=None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    from .recurrent import RecurrentDecoder
    if args.stream and args.num_samples > 1:
        raise cli.UserError("--stream prints one sample: use it with --num-samples 1")
    if args.prompt is not None and args.prompt_file is not None:
        raise cli.UserError("pass --prompt or --prompt-file, not both")
    device = cli.setup_runtime(args)
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    model = cli.load_model(args, device)
    tokenizer = model.tokenizer
    prompt_ids = _encode_prompt(tokenizer, prompt)
    if args.cuda_graph == "on" and device.type != "cuda":
        raise cli.UserError(f"--cuda-graph on needs a CUDA device, the model is on {device.type}: pass "
                            "--device cuda, or --cuda-graph auto")
    decoder = RecurrentDecoder(model, torch.bfloat16 if args.bf16_weights else None,
                               exact_batches=args.exact_batches, cuda_graph=args.cuda_graph)
    decoder.collect_spikes = args.spike_stats
    generator = torch.Generator(device="cpu")
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()

    def write_piece(_sample, piece):
        out.write(piece)
        out.flush()

    on_text = write_piece if args.stream else None
    if args.stream:
        write_piece(0, prompt)

    t0 = time.perf_counter()
    interrupted = False
    try:
        samples = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           generator, stop=args.stop, num_samples=args.num_samples, tokenizer=tokenizer,
                           on_text=on_text, decoder=decoder)
    except GenerationInterrupted as e:
        samples, interrupted = e.samples, True
    elapsed = time.perf_counter() - t0
    if args.stream:
        out.write("\n")
    else:
        for b, ids in enumerate(samples):
            text, _ = truncate_at_stop(tokenizer.decode(ids), args.stop)
            if b:
                out.write("\n" + "-" * 40 + "\n")
            out.write(prompt + text)
        out.write("\n")
    out.flush()
    n_new = sum(len(s) for s in samples)
    err.write(f"{n_new} tokens in {elapsed:.2f} s ({n_new / max(elapsed, 1e-9):.1f} tokens/s, "
              f"prompt {len(prompt_ids) or 'empty: start token ' + str(start_token(tokenizer))}"
              f"{' tokens' if prompt_ids else ''}, batch {args.num_samples}"
              f"{', bf16 weights' if args.bf16_weights else ''}{_graph_note(decoder, device)})\n")
    if interrupted:
        err.write("interrupted (Ctrl-C): the text above is what was generated until then\n")
        return cli.EXIT_INTERRUPTED
    if args.spike_stats:
        if decoder.spike_steps == 0:
            err.write("spike stats: no generated token went through a step\n")
        else:
            rates = decoder.spike_counts / (decoder.spike_steps * model.config.n_embd)
            err.write("firing rates of the generated tokens (fraction of neurons spiking per token):\n")
            err.write("layer   att-LIF  ffn-LIF\n")
            for l, (a, f) in enumerate(rates.tolist()):
                err.write(f"{l:5d}   {a:7.4f}  {f:7.4f}\n")
            err.write(f"mean    {rates[:, 0].mean():7.4f}  {rates[:, 1].mean():7.4f}\n")
    return 0


def main(argv=None) -> int:
    return cli.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
