"""``python -m spikegpt.spikify``: make the input of every linear layer of a trained model a spike train.

    python -m spikegpt.spikify --ckpt RUN --data-dir DIR --out OUT.pt [--bits 4 --salient-frac 0.1
        --extra-steps 1 --saliency spikellm --encoding token-minmax --calib-tokens 8192 --json R.json]
    python -m spikegpt.spikify --ckpt RUN --data-dir DIR --out STEM --sweep    # STEM.json, .md, .png

Calibration tokens come from the train split; bits per token are measured on the first
``--eval-tokens`` of the validation split before and after the conversion.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import cli
from ..errors import UserError
from .encoding import ENCODINGS, SALIENCY_METHODS, SpikifyConfig


def build_parser():
    p = cli.new_parser("python -m spikegpt.spikify", "Spike-encode the input of every linear layer of a trained "
                       "model (SpikeLLM's Optimal Brain Spiking) and write the converted checkpoint.")
    cli.add_model_args(p)
    p.add_argument("--data-dir", help="prepared dataset the model was trained on (default: the built-in corpus)")
    p.add_argument("--out", required=True, help="the converted checkpoint (.pt); with --sweep, the stem of the "
                   "report files STEM.json, STEM.md and STEM.png")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the report files) if they exist")
    p.add_argument("--calib-tokens", type=cli.positive_int, default=8192,
                   help="calibration tokens from the train split (at least 256)")
    p.add_argument("--bits", type=cli.positive_int, default=4, help="bits per spike step b (2^b levels per step)")
    p.add_argument("--salient-frac", type=cli.unit_interval, default=0.1,
                   help="fraction p of salient channels per layer")
    p.add_argument("--extra-steps", type=cli.nonneg_int, default=1, help="salient channels get 2^a steps (b + a bits)")
    p.add_argument("--salient-full-precision", action="store_true",
                   help="keep the salient channels real-valued (the upper bound of the method)")
    p.add_argument("--saliency", choices=SALIENCY_METHODS, default="spikellm", help="channel ranking")
    p.add_argument("--encoding", choices=ENCODINGS, default="token-minmax",
                   help="token-minmax: per-token ranges (SpikeLLM); channel-static: per-channel thresholds "
                        "fixed from calibration (a real SNN)")
    p.add_argument("--finetune-iters", type=cli.nonneg_int, default=0,
                   help="straight-through fine-tuning steps of the channel-static thresholds")
    p.add_argument("--eval-tokens", type=cli.nonneg_int, default=20000,
                   help="validation tokens for bits per token before and after (0: skip)")
    p.add_argument("--sweep", action="store_true", help="run the experiment grid instead of one conversion")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the random saliency")
    cli.add_json_arg(p)
    cli.add_device_arg(p)
    cli.add_threads_arg(p)
    return p


def _outputs(args) -> list:
    if args.sweep:
        return [Path(f"{args.out}.{ext}") for ext in ("json", "md", "png")]
    return [Path(args.out)] + ([Path(args.json_out)] if args.json_out else [])


def run(args) -> dict:
    from ..data import default_corpus_dir, load_meta, open_split
    from ..evaluate import evaluate_tokens
    from .convert import MIN_CALIB_TOKENS, calibration_batches, is_converted, save_converted, spikify

    for path in _outputs(args):
        if path.is_dir():
            raise UserError(f"{path} is a directory: pass a file name")
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} exists: pass another --out, or --overwrite to replace it")
    if args.calib_tokens < MIN_CALIB_TOKENS:
        raise UserError(f"--calib-tokens {args.calib_tokens} is too few to rank channels: pass at least "
                        f"{MIN_CALIB_TOKENS}")
    if args.finetune_iters and args.encoding != "channel-static":
        raise UserError("--finetune-iters tunes fixed thresholds: use it with --encoding channel-static")
    if args.sweep:
        _require_matplotlib()
    cfg = SpikifyConfig(bits=args.bits, salient_frac=args.salient_frac, extra_steps=args.extra_steps,
                        saliency=args.saliency, encoding=args.encoding,
                        salient_full_precision=args.salient_full_precision, calib_tokens=args.calib_tokens,
                        finetune_iters=args.finetune_iters, seed=args.seed)
    device = cli.setup_runtime(args)
    model = cli.load_model(args, device, need_tokenizer=False)
    source = str(args.ckpt or args.reference)
    if is_converted(model):
        raise UserError(f"{source} is already converted by spikegpt.spikify: convert the original checkpoint")
    data_dir = args.data_dir or default_corpus_dir()
    meta = load_meta(data_dir)
    cli.check_data_matches(model, meta, data_dir)
    train = open_split(data_dir, "train", meta, model.config.vocab_size)
    try:
        batches = calibration_batches(train, args.calib_tokens, model.config.ctx_len)
    except ValueError as e:
        raise UserError(f"too few calibration tokens: {e}; pass a smaller --calib-tokens") from None
    val = open_split(data_dir, "val", meta, model.config.vocab_size) if args.eval_tokens or args.sweep else None
    if val is not None and len(val) < 2:
        raise UserError(f"the val split of {data_dir} has fewer than 2 tokens: prepare more text")

    def bits_per_token(m):
        return evaluate_tokens(m, val, m.config.ctx_len, carry_state=True, streams=8,
                               max_tokens=args.eval_tokens or 20000, device=device)["bits_per_token"]

    if args.sweep:
        return _sweep(args, model, batches, bits_per_token, device)
    start = time.perf_counter()
    before = bits_per_token(model) if args.eval_tokens else None
    out = spikify(model, batches, cfg)
    after = bits_per_token(model) if args.eval_tokens else None
    result = {"config": cfg.to_dict(), "avg_bits": cfg.avg_bits, "avg_steps": cfg.avg_steps, "source": source,
              "out": str(args.out), "calib_tokens": sum(b[:, :-1].numel() for b in batches),
              "eval_tokens": args.eval_tokens or None, "bits_per_token_before": before,
              "bits_per_token_after": after, "finetune_losses": out["finetune_losses"],
              "salient": out["salient"], "seconds": time.perf_counter() - start}
    save_converted(args.out, model, cfg, source, metrics={"bits_per_token_before": before,
                                                           "bits_per_token_after": after})
    print(f"converted {source} -> {args.out}: b={cfg.bits} p={cfg.salient_frac} a={cfg.extra_steps} "
          f"({cfg.avg_bits:g} bits, {cfg.avg_steps:g} steps per activation), {cfg.saliency}, {cfg.encoding}")
    if before is not None:
        print(f"bits/token on {args.eval_tokens:,} val tokens: {before:.4f} -> {after:.4f} "
              f"({100 * (after / before - 1):+.2f}%)")
    if args.json_out:
        cli.write_json(args.json_out, result)
    return result


def _sweep(args, model, batches, bits_per_token, device) -> dict:
    from ..fileio import atomic_write_json, atomic_write_text
    from .saliency import calibrate
    from .sweep import markdown, plot, run_sweep

    stats = calibrate(model, [b.to(device) for b in batches], taylor=True)
    res = run_sweep(model, stats, bits_per_token, args.encoding, log=lambda s: print(s, flush=True))
    res.update(source=str(args.ckpt or args.reference), calib_tokens=sum(b[:, :-1].numel() for b in batches),
               eval_tokens=args.eval_tokens or 20000, model=model.config.to_dict())
    json_path, md_path, png_path = _outputs(args)
    atomic_write_json(json_path, res)
    atomic_write_text(md_path, markdown(res))
    plot([(Path(res["source"]).name, res)], png_path)
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return res


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--sweep plots with matplotlib: pip install matplotlib (or pip install -e '.[plot]')") \
            from None


def main(argv=None) -> int:
    return cli.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
