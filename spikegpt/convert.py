"""Convert a reference SpikeGPT checkpoint (``torch.save(state_dict)``) into a spikegpt checkpoint.

    python -m spikegpt.convert SpikeGPT-216M.pth --config 216m.json --out spikegpt-216m.pt \\
        --tokenizer 20B_tokenizer.json [--binary-embedding | --no-binary-embedding] [--v-threshold 1.0]

A reference checkpoint carries no config: ``--config`` is the JSON of its sizes (vocab_size, n_layer,
n_embd, ctx_len; other ModelConfig fields allowed).  It does not record whether the model binarised its
embedding nor its LIF threshold either: pick them with ``--binary-embedding/--no-binary-embedding`` and
``--v-threshold`` (evaluate the held-out loss of each candidate with ``python -m spikegpt.evaluate`` and
keep the best).  The result loads with ``spikegpt.load`` and samples with ``generate.py --ckpt``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def build_parser():
    from . import cli
    p = cli.new_parser("python -m spikegpt.convert", __doc__.split("\n\n")[0])
    p.add_argument("pth", help="reference state_dict file (.pth)")
    p.add_argument("--config", required=True, help="reference config JSON (vocab_size, n_layer, n_embd, ...)")
    p.add_argument("--out", required=True, help="output checkpoint file (.pt); never an existing file "
                   "without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never a "
                   "training checkpoint)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to store in the checkpoint: 'byte', a tokenizer.json (BPE) or a "
                        "Tokenizer.to_dict() JSON; its vocabulary must match the model's")
    p.add_argument("--binary-embedding", dest="binary_embedding", action="store_true", default=None,
                   help="the model binarises its embedding, x = H(E[idx]) (default)")
    p.add_argument("--no-binary-embedding", dest="binary_embedding", action="store_false",
                   help="the model feeds E[idx] itself")
    p.add_argument("--v-threshold", type=cli.positive_float, default=None, help="LIF threshold (default 1.0)")
    return p


def convert(pth, config, out, tokenizer=None, binary_embedding=None, v_threshold=None):
    """Convert; ``config`` is a dict or JSON path; returns the converted model."""
    from .checkpoint import from_reference, save_model
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    config = dict(config)
    if binary_embedding is not None:
        config["binary_embedding"] = binary_embedding
    if v_threshold is not None:
        config["v_threshold"] = v_threshold
    model = from_reference(pth, config)
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) does not match the model's "
                         f"({model.config.vocab_size})")
    save_model(out, model, tokenizer=tokenizer,
               extra={"converted_from": {"path": Path(pth).name, "config": config}})
    return model


def check_output(out, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a directory, a training checkpoint, or (without ``--overwrite``) any
    existing file."""
    from .checkpoint import CheckpointError, read_checkpoint
    from .errors import UserError
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass a file name such as {out / 'model.pt'}")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--out {out} exists: pass another file name, or --overwrite to replace it")
    try:
        existing = read_checkpoint(out)
    except CheckpointError:
        return
    if existing.get("optimizer") is not None:
        raise UserError(f"--out {out} is a training checkpoint (it holds an optimizer state), which "
                        "converting would destroy: pass another file name")


def run(args) -> None:
    from .cli import load_tokenizer
    from .errors import UserError
    if not Path(args.config).is_file():
        raise UserError(f"config {args.config} not found: pass the reference model's config JSON")
    check_output(args.out, args.overwrite)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    try:
        model = convert(args.pth, args.config, args.out, tokenizer, args.binary_embedding, args.v_threshold)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    c = model.config
    print(f"wrote {args.out}: n_layer {c.n_layer}, n_embd {c.n_embd}, vocab {c.vocab_size}, "
          f"{model.num_params():,} parameters, binary_embedding={c.binary_embedding}, "
          f"v_threshold={c.v_threshold}, tokenizer {getattr(tokenizer, 'kind', None)}")


def main(argv=None) -> int:
    from .cli import run_cli
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
