"""Training: ``python train.py --preset tiny`` (see ``--help``).

One run lives in ``--out-dir``: checkpoints ``ckpt-*.pt`` (the last ``--keep-checkpoints``),
``metrics.jsonl`` (one JSON record per log line and evaluation) and ``config.json``.  Training is
exactly resumable: the data sampler is a pure function of (seed, rank, step, micro-step) and the
checkpoint holds the model, the optimizer and the RNG states, so on a CPU ``N`` steps + kill + resume
+ ``N`` steps gives bitwise the parameters and losses of ``2N`` steps straight.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel

from . import cli, ops
from .checkpoint import (atomic_save, build_checkpoint, checkpoint_path, latest_checkpoint, prune_checkpoints,
                         read_checkpoint, versions)
from .config import (GIF_DEFAULTS, GIF_THRESHOLD, LIF_THRESHOLD, NEURONS, POLARITIES, PRESETS, ModelConfig,
                     TrainConfig, preset, split_overrides)
from .data import default_corpus_dir, load_meta, open_split, sample_batch
from .errors import UserError
from .evaluate import evaluate_tokens
from .metrics import unit_metrics
from .model import SpikeGPT
from .distributed import all_reduce_sum, init_distributed, rng_state, set_rng_state
from .rundir import MetricsLog, RunLock, Wandb, prepare_dir, write_config
from .spikes import all_reduce_spike_stats, firing_rates, level_stats, record_spikes
from .tokenizer import tokenizer_from_dict

ARCH_FIELDS = ("vocab_size", "n_layer", "n_embd", "ffn_mult", "tau", "v_threshold", "surrogate_alpha",
               "binary_embedding", "spiking", "neuron", "levels", "polarity", "reset", "surrogate",
               "learn_threshold")


class TrainingError(UserError):
    """A problem with a training run that the user can fix (the message names the fix)."""


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    m, t = ModelConfig(), TrainConfig()
    p = cli.new_parser("train.py", "Train a SpikeGPT model. Flags left out come from --preset, then from the "
                       "defaults shown; on resume, from the checkpoint.")
    a = p.add_argument
    a("--data-dir", default=None, help="prepared dataset (data/prepare_*.py); default: the built-in "
      "corpus of Python standard-library docstrings, prepared into a cache directory")
    a("--preset", default="tiny", choices=sorted(PRESETS), help="model and schedule preset")
    a("--n-layer", type=cli.positive_int, default=None, help=f"blocks (tiny: {preset('tiny')[0]['n_layer']})")
    a("--n-embd", type=cli.positive_int, default=None, help=f"model width (tiny: {preset('tiny')[0]['n_embd']})")
    a("--ctx-len", type=cli.positive_int, default=None, help="training context length (tokens)")
    a("--dropout", type=cli.fraction, default=None, help=f"residual dropout in [0, 1) (default {m.dropout})")
    a("--v-threshold", type=cli.positive_float, default=None,
      help=f"firing threshold (default {LIF_THRESHOLD}; {GIF_THRESHOLD} for gif and quant with --levels > 1)")
    a("--tau", type=cli.positive_float, default=None, help=f"LIF time constant (default {m.tau})")
    a("--no-spike", dest="spiking", action="store_false", default=None,
      help="ablation: LIF neurons become the identity and the embedding is not binarised (plain RWKV)")
    # The neuron (issue 13): multi-level GIF spiking neurons of SpikeLLM, and their controls.
    a("--neuron", default=None, choices=NEURONS, help="lif: binary spikes; gif: multi-level integrate-"
      "and-fire; quant: the GIF quantizer without a membrane carried between tokens (default lif)")
    a("--levels", type=int, default=None, help=f"GIF spike levels L (default {GIF_DEFAULTS['levels']})")
    a("--polarity", default=None, choices=POLARITIES, help=f"GIF spike counts 0..L or -L..L "
      f"(default {GIF_DEFAULTS['polarity']})")
    a("--reset", default=None, choices=("hard", "soft"), help="GIF reset: membrane to 0, or minus "
      f"theta * count (default {GIF_DEFAULTS['reset']})")
    a("--surrogate", default=None, choices=("atan", "ste"), help="GIF surrogate gradient "
      f"(default {GIF_DEFAULTS['surrogate']})")
    a("--learn-threshold", action="store_true", default=None, help="GIF: learn one threshold per branch")
    a("--batch-size", type=cli.positive_int, default=None, help=f"sequences per micro-batch (default {t.batch_size})")
    a("--grad-accum", type=cli.positive_int, default=None,
      help=f"micro-batches per optimizer step (default {t.grad_accum})")
    a("--max-iters", type=cli.positive_int, default=None, help="optimizer steps in total (tiny: 2000)")
    a("--lr", type=cli.positive_float, default=None, help="peak learning rate (tiny: 2e-3, 45m/216m: 6e-4)")
    a("--min-lr", type=cli.nonneg_float, default=None, help="final learning rate of the cosine schedule "
      "(at most --lr)")
    a("--warmup-iters", type=cli.nonneg_int, default=None, help="linear warm-up steps")
    a("--weight-decay", type=cli.nonneg_float, default=None,
      help=f"AdamW weight decay on matrices (default {t.weight_decay})")
    a("--grad-clip", type=cli.nonneg_float, default=None, help=f"gradient-norm clip, 0 = off (default {t.grad_clip})")
    a("--eval-interval", type=cli.nonneg_int, default=None, help="steps between validations; 0 = off")
    a("--eval-iters", type=cli.positive_int, default=None, help="batches per periodic validation")
    a("--eval-split", type=cli.split_name, default="val", help="split of the final full evaluation (val or test)")
    a("--eval-carry-state", action=argparse.BooleanOptionalAction, default=True,
      help="final evaluation carries the recurrent state across consecutive windows "
      "(--no-eval-carry-state: every window starts from the zero state)")
    a("--eval-streams", type=cli.positive_int, default=8, help="final evaluation: the split is cut into this "
      "many contiguous streams evaluated as one batch, each carrying its own state")
    a("--eval-max-tokens", type=cli.positive_int, default=None, help="final evaluation: only the first N tokens")
    a("--log-interval", type=cli.positive_int, default=None, help=f"steps between log lines (default {t.log_interval})")
    a("--checkpoint-interval", type=cli.positive_int, default=None, help="steps between checkpoints "
      "(default: --eval-interval, or 500 when that is 0); a checkpoint is always written at the end")
    a("--keep-checkpoints", type=cli.nonneg_int, default=None,
      help=f"checkpoints kept, 0 = all (default {t.keep_checkpoints})")
    a("--out-dir", default="out/run", help="run directory (checkpoints, metrics.jsonl, config.json); one run "
      "owns it at a time")
    a("--resume", default="auto", help="auto: continue the run in --out-dir if it has a checkpoint; "
      "never: start fresh (refuses a directory that already has checkpoints); PATH: that checkpoint")
    a("--init-from", default=None, help="start a new run (step 0, fresh optimizer) from the weights of "
      "this checkpoint or run directory: fine-tuning, e.g. with a new --lr")
    a("--seed", type=cli.nonneg_int, default=None,
      help=f"seed of init, dropout and data sampling (default {t.seed})")
    cli.add_device_arg(p)
    cli.add_dtype_arg(p, default=None)
    cli.add_kernels_arg(p)
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--wandb-mode", default="disabled", choices=["disabled", "offline", "online"],
      help="Weights & Biases logging (offline works without a network)")
    a("--wandb-project", default="spikegpt", help="wandb project name")
    a("--sample-tokens", type=cli.nonneg_int, default=200, help="tokens sampled at the end of training (0 = none)")
    a("--sample-prompt", default="The ", help="prompt of the final sample")
    cli.add_threads_arg(p)
    return p


def resolve_configs(args) -> tuple[dict, dict]:
    """(ModelConfig overrides, TrainConfig overrides) from --preset and the explicit flags."""
    model_over, train_over = preset(args.preset)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    if flags.get("spiking") is False:
        flags["binary_embedding"] = False
    m, t = split_overrides({k: v for k, v in flags.items()
                            if k in {f.name for f in dataclasses.fields(ModelConfig)}
                            or k in {f.name for f in dataclasses.fields(TrainConfig)}})
    return {**model_over, **m}, {**train_over, **t}


# --------------------------------------------------------------------------------------------------
# Pieces of the loop.
# --------------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_iters``."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    span = max(cfg.max_iters - cfg.warmup_iters, 1)
    progress = min((step - cfg.warmup_iters) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: SpikeGPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam(W) with the reference's betas and eps; weight decay (if any) on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


def autocast_for(dtype: str, device: torch.device):
    """A zero-argument context factory for the forward pass, and the dtype name actually used."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext, dtype
    if dtype == "fp16" and device.type != "cuda":
        raise TrainingError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return (lambda: torch.autocast(device.type, dtype=torch_dtype)), dtype


@torch.no_grad()
def estimate_loss(model, tokens, cfg: TrainConfig, ctx_len: int, device, autocast, rank=0, world=1) -> float:
    """Mean loss over ``eval_iters`` fixed random batches (the same batches at every evaluation),
    shared out between the processes."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(rank, cfg.eval_iters, world):
        x, y = sample_batch(tokens, cfg.batch_size, ctx_len, seed=cfg.seed + 1, step=i)
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total, count = total + loss.item(), count + 1
    model.train(was_training)
    total, count = all_reduce_sum([total, count], world, device)
    return total / count


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------
def check_thresholds(model, step: int) -> None:
    """A learnable GIF threshold must stay positive (one host sync per step, only with learnt ones)."""
    named = [(n, p) for n, p in model.named_parameters() if n.endswith(".threshold")]
    if named and float(torch.stack([p.detach() for _, p in named]).min()) <= 0:
        bad = ", ".join(f"{n} = {p.item():.3g}" for n, p in named if p.item() <= 0)
        raise TrainingError(f"a learnable threshold fell to <= 0 at step {step + 1} ({bad}); lower --lr, "
                            "or train with a fixed threshold (drop --learn-threshold)")


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    newest = latest_checkpoint(out_dir)
    if resume == "never":
        if newest is not None:
            raise TrainingError(f"{out_dir} already holds checkpoints and --resume never would overwrite "
                                "them: use --resume auto to continue that run, or another --out-dir")
        return None
    if resume == "auto":
        return newest
    path = Path(resume)
    if not path.exists():
        raise TrainingError(f"--resume {resume}: no such checkpoint (use auto, never, or a ckpt-*.pt path)")
    if path.is_dir():
        path = latest_checkpoint(path) or path
    if newest is not None and path.resolve() != newest.resolve():
        # Pruning keeps the highest step numbers: the resumed run's checkpoints would be deleted, and
        # the other run's metrics.jsonl cut back.
        raise TrainingError(f"--out-dir {out_dir} holds checkpoints up to {newest.name}, which continuing "
                            f"{path} there would destroy: pass an empty --out-dir to continue {path} in it, "
                            "or --resume auto to continue the run in --out-dir")
    return path


def check_architecture(saved: dict, requested: dict, source: str) -> None:
    clashes = [f"{k}={requested[k]} (checkpoint: {saved[k]})" for k in ARCH_FIELDS
               if k in requested and k in saved and requested[k] != saved[k]]
    if clashes:
        raise TrainingError(f"architecture flags contradict the checkpoint {source}: " + ", ".join(clashes)
                            + "; drop those flags to continue that run, or use a new --out-dir")


def load_configs(args, meta, out_dir):
    """(ModelConfig, TrainConfig, checkpoint to resume or None, checkpoint to initialise from or None)."""
    model_over, train_over = resolve_configs(args)
    explicit_model = {k: v for k, v in model_over.items() if getattr(args, k, None) is not None}
    explicit_train = {k: v for k, v in train_over.items() if getattr(args, k, None) is not None}
    resume_path = find_resume_checkpoint(args.resume, out_dir)
    if resume_path is not None and args.init_from:
        raise TrainingError(f"--init-from starts a new run, but {resume_path} would be resumed: pass a new "
                            "--out-dir to fine-tune, or drop --init-from to continue that run")
    ckpt = read_checkpoint(resume_path) if resume_path else None
    init = read_checkpoint(args.init_from) if args.init_from else None
    base = ckpt or init
    try:
        if base is not None:
            check_architecture(base["model_config"], explicit_model, base["path"])
            model_cfg = ModelConfig.from_dict({**base["model_config"], **{k: v for k, v in explicit_model.items()
                                                                        if k not in ARCH_FIELDS}})
        else:
            model_cfg = ModelConfig(**{"vocab_size": meta["vocab_size"], **model_over})
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if ckpt is not None:
        train_cfg = TrainConfig(**{**ckpt["train_config"], **explicit_train})
    else:
        train_cfg = TrainConfig(**train_over)
    if train_cfg.min_lr > train_cfg.lr:
        if args.min_lr is not None:
            raise TrainingError(f"--min-lr {train_cfg.min_lr} exceeds the peak --lr {train_cfg.lr}: the schedule "
                                "decays from --lr to --min-lr; lower --min-lr")
        train_cfg.min_lr = train_cfg.lr  # a preset's floor above a lower --lr: a constant schedule
    return model_cfg, train_cfg, ckpt, init


def check_data(model_cfg, meta, data_dir, base_ckpt, splits):
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise TrainingError(f"vocabulary mismatch: the model has vocab_size={model_cfg.vocab_size} but "
                            f"{data_dir} was prepared with {meta['vocab_size']} tokens; train on data "
                            "prepared with the same vocabulary, or start a new run in another --out-dir")
    if base_ckpt is not None and base_ckpt.get("tokenizer") and base_ckpt["tokenizer"] != meta["tokenizer"]:
        raise TrainingError(f"the dataset {data_dir} was tokenized differently from the checkpoint "
                            f"{base_ckpt['path']}; use data prepared with the same tokenizer, or a new --out-dir")
    for name, split in splits.items():
        if split is not None and len(split) < model_cfg.ctx_len + 1:
            raise TrainingError(f"the {name} split of {data_dir} has {len(split):,} tokens, fewer than "
                                f"--ctx-len {model_cfg.ctx_len} + 1; use --ctx-len {max(len(split) - 1, 1)} "
                                "or less, or more data")


def run(args) -> dict:
    """Train as ``args`` say (the parsed flags of :func:`build_parser`); returns a summary dict.

    Under torchrun every process runs this; rank 0 alone logs, evaluates-reports and writes
    checkpoints.  The windows of a step are indexed by the global micro-batch number
    ``g = rank * grad_accum + micro``, so the data order depends only on the global batch, not on
    how it is spread over processes.
    """
    threads = args.threads or cli.default_threads()
    if threads:
        torch.set_num_threads(threads)
    ops.set_backend(args.kernels)
    rank, world, device = init_distributed(args.device)
    try:
        out_dir = Path(args.out_dir)
        if rank == 0:
            prepare_dir(out_dir)
        with RunLock(out_dir) if rank == 0 else contextlib.nullcontext():
            result = _run(args, rank, world, device)
        if world > 1:  # no rank tears its connections down while another still uses them
            dist.barrier()
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(args, rank, world, device) -> dict:
    main_process = rank == 0
    out_dir = Path(args.out_dir)
    data_dir = Path(args.data_dir) if args.data_dir else default_corpus_dir()
    meta = load_meta(data_dir)
    train_tokens = open_split(data_dir, "train", meta)
    val_tokens = open_split(data_dir, "val", meta) if "val" in meta["splits"] else None
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    model_cfg, train_cfg, ckpt, init = load_configs(args, meta, out_dir)
    check_data(model_cfg, meta, data_dir, ckpt or init, {"train": train_tokens, "val": val_tokens})
    checkpoint_interval = args.checkpoint_interval or train_cfg.eval_interval or 500

    torch.manual_seed(train_cfg.seed)
    model = SpikeGPT(model_cfg).to(device)
    model.tokenizer = tokenizer
    if init is not None:
        model.load_state_dict(init["model"])
    optimizer = make_optimizer(model, train_cfg)
    step, tokens_seen = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        set_rng_state(ckpt["rng"])
    if world > 1:  # each process its own dropout masks
        torch.manual_seed(train_cfg.seed + 1000 * rank + step)
    autocast, dtype_used = autocast_for(train_cfg.dtype if args.dtype is None else args.dtype, device)
    forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    forward = torch.compile(forward) if train_cfg.compile else forward
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * world

    run_info = {"model_config": model_cfg.to_dict(), "train_config": dataclasses.asdict(train_cfg),
                "data_dir": str(data_dir), "device": str(device), "dtype": dtype_used, "world_size": world,
                "kernels": args.kernels, "n_params": model.num_params(), "versions": versions(),
                "init_from": init["path"] if init else None}
    if main_process:
        write_config(out_dir, run_info)
        metrics = MetricsLog(out_dir, step if ckpt is not None else None)
        wandb = Wandb(args.wandb_mode, args.wandb_project, out_dir, run_info, run_id=out_dir.resolve().name)
    bytes_per_token = meta["splits"]["train"]["bytes"] / max(meta["splits"]["train"]["tokens"], 1)

    def log(record):
        if main_process:
            metrics.write(record)
            wandb.log(record, record["step"])

    def say(text):
        if main_process:
            tqdm.write(text)

    def save(last_metrics=None):
        if not main_process:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingError(f"the weights are not finite after step {step}; stopped without saving. The "
                                f"last good checkpoint is {latest_checkpoint(out_dir) or '(none yet)'}: lower "
                                "--lr or raise --warmup-iters and resume from it")
        atomic_save(build_checkpoint(
            model, tokenizer, train_config=dataclasses.asdict(train_cfg), optimizer=optimizer, step=step,
            tokens_seen=tokens_seen, rng=rng_state(),
            sampler={"kind": "stateless-global-micro-batch", "seed": train_cfg.seed, "world_size": world,
                     "grad_accum": train_cfg.grad_accum},
            data={"data_dir": str(data_dir) if args.data_dir else None, "meta": meta}, metrics=last_metrics),
            checkpoint_path(out_dir, step))
        prune_checkpoints(out_dir, train_cfg.keep_checkpoints)

    def accumulate_gradients(step) -> float:
        """Forward and backward over the step's micro-batches; returns the summed loss."""
        loss_sum = 0.0
        for micro in range(train_cfg.grad_accum):
            x, y = sample_batch(train_tokens, train_cfg.batch_size, model_cfg.ctx_len, seed=train_cfg.seed,
                                step=step, micro_step=rank * train_cfg.grad_accum + micro)
            sync = world == 1 or micro == train_cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else forward.no_sync()), autocast():
                _, loss = forward(x.to(device), y.to(device))
            (loss / train_cfg.grad_accum).backward()
            loss_sum += loss.item()
        return loss_sum

    stop_signal = []
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    origin = (f"resuming {ckpt['path']} at step {step}" if ckpt else
              f"fine-tuning from {init['path']}" if init else "training from scratch")
    say(f"{origin}: {model.num_params() / 1e6:.2f}M parameters, L{model_cfg.n_layer} C{model_cfg.n_embd} "
        f"ctx {model_cfg.ctx_len}, vocab {model_cfg.vocab_size} ({meta['vocab_kind']}), data {data_dir}, "
        f"{device} {dtype_used}; global batch {global_batch} sequences = {train_cfg.batch_size} per device x "
        f"{train_cfg.grad_accum} accumulation x {world} processes")
    bar = tqdm(total=train_cfg.max_iters, initial=step, desc="train", dynamic_ncols=True,
               disable=not (main_process and sys.stderr.isatty()))
    model.train()
    last_eval, window_start, window_tokens = None, time.perf_counter(), 0
    try:
        while step < train_cfg.max_iters:
            lr = learning_rate(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Firing rates of the training batches are recorded on the steps that are logged.
            log_now = (step + 1) % train_cfg.log_interval == 0 or step + 1 == train_cfg.max_iters
            with record_spikes(model) if log_now else contextlib.nullcontext():
                loss_sum = accumulate_gradients(step)
            if log_now:
                all_reduce_spike_stats(model)
            loss_value = all_reduce_sum([loss_sum], world, device)[0] / (train_cfg.grad_accum * world)
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip).item()
                         if train_cfg.grad_clip > 0 else float("nan"))
            if not math.isfinite(loss_value) or (train_cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
                what = f"the loss became {loss_value}" if not math.isfinite(loss_value) else \
                    f"the gradient norm became {grad_norm}"
                raise TrainingError(f"{what} at step {step + 1}; stopped without saving. The last good "
                                    f"checkpoint is {latest_checkpoint(out_dir) or '(none yet)'}: lower --lr "
                                    "or raise --warmup-iters and resume from it")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            check_thresholds(model, step)
            step += 1
            tokens_seen += global_batch * model_cfg.ctx_len
            window_tokens += global_batch * model_cfg.ctx_len
            bar.update(1)

            if step % train_cfg.log_interval == 0 or step == train_cfg.max_iters:
                now = time.perf_counter()
                record = {"step": step, "loss": loss_value, "bits_per_token": loss_value / math.log(2),
                          "bits_per_byte": loss_value / math.log(2) / bytes_per_token, "lr": lr,
                          "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                          "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                          **firing_rates(model, "train_rate/"), **level_stats(model, "train_")}
                window_start, window_tokens = now, 0
                log(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{record['bits_per_byte']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if bar.disable:
                    say(f"step {step:6d}  loss {loss_value:.4f}  bpb {record['bits_per_byte']:.3f}  "
                        f"lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s")
            if val_tokens is not None and train_cfg.eval_interval and step % train_cfg.eval_interval == 0:
                with record_spikes(model):
                    val_loss = estimate_loss(model, val_tokens, train_cfg, model_cfg.ctx_len, device, autocast,
                                             rank, world)
                all_reduce_spike_stats(model)
                rates = firing_rates(model, "rate/")
                last_eval = {"step": step, "val_loss": val_loss, "val_bits_per_token": val_loss / math.log(2),
                             **rates, **level_stats(model)}
                log(last_eval)
                say(f"step {step:6d}  val loss {val_loss:.4f}  val bits/token {val_loss / math.log(2):.3f}"
                    + (f"  firing rate att {rates['rate/att']:.3f} ffn {rates['rate/ffn']:.3f}"
                       + (f" emb {rates['rate/emb']:.3f}" if "rate/emb" in rates else "") if rates else ""))
            if step % checkpoint_interval == 0 or step == train_cfg.max_iters:
                save(last_eval)
            if stop_signal:
                if step % checkpoint_interval:
                    save(last_eval)
                raise TrainingError(f"interrupted by signal {stop_signal[0]} at step {step}; checkpoint "
                                    f"saved in {out_dir}, continue with --resume auto")
        bar.close()
        for s, handler in previous_handlers.items():  # from here the first Ctrl-C stops the run
            signal.signal(s, handler)
        result = {"step": step, "out_dir": str(out_dir)}
        try:
            result.update(final_evaluation(model, data_dir, meta, args, model_cfg, device, autocast, log, say,
                                           step, rank, world))
            if args.sample_tokens > 0 and main_process:
                result["sample"] = sample_text(model, tokenizer, args.sample_prompt, args.sample_tokens,
                                               train_cfg.seed)
                say("--- sample ---\n" + result["sample"] + "\n--------------")
        except KeyboardInterrupt:
            say(f"interrupted after training: the checkpoint of step {step} is saved in {out_dir}; evaluate it "
                "with python -m spikegpt.evaluate --ckpt " + str(out_dir))
            raise
        return result
    finally:
        bar.close()
        if main_process:
            metrics.close()
            wandb.finish()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)


def final_evaluation(model, data_dir, meta, args, model_cfg, device, autocast, log, say, step,
                     rank=0, world=1) -> dict:
    split = "val" if args.eval_split == "valid" else args.eval_split
    if split not in meta["splits"]:
        say(f"no {split!r} split in {data_dir}: final evaluation skipped")
        return {}
    tokens = open_split(data_dir, split, meta)
    start = time.perf_counter()
    with record_spikes(model):
        result = evaluate_tokens(model, tokens, window=model_cfg.ctx_len, carry_state=args.eval_carry_state,
                                 streams=args.eval_streams, max_tokens=args.eval_max_tokens, device=device,
                                 autocast=autocast, part=(rank, world))
    all_reduce_spike_stats(model)
    result.update(firing_rates(model, "rate/"), **level_stats(model))
    nll, count = all_reduce_sum([result["nll_sum"], result["predicted_tokens"]], world, device)
    result.update(nll_sum=nll, predicted_tokens=int(count), loss=nll / count)
    result.update(unit_metrics(nll, int(count), meta["splits"][split]))
    record = {"step": step, "final_eval": split, **result, "seconds": time.perf_counter() - start}
    log(record)
    units = "  ".join(f"{k.replace('_', ' ')} {result[k]:.4f}" for k in ("bits_per_byte", "bits_per_char")
                      if k in result)
    say(f"final {split}: loss {result['loss']:.4f}  bits/token {result['bits_per_token']:.4f}  {units}  "
        f"({result['predicted_tokens']:,} tokens, window {result['window']}, "
        f"state {'carried' if result['carry_state'] else 'reset per window'}, {result['streams']} streams)")
    return {"final_" + k: v for k, v in record.items() if k not in ("step", "final_eval")}


def sample_text(model, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    """A sample of ``n_tokens`` after ``prompt`` (characters outside a char vocabulary become its
    unknown id), temperature 0.8, nucleus 0.95."""
    from .generate import generate
    ids = tokenizer.encode(prompt, errors="unk") if tokenizer.kind == "char" else tokenizer.encode(prompt)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    (new_ids,) = generate(model, ids, max_new_tokens=n_tokens, temperature=0.8, top_p=0.95, generator=generator)
    return prompt + tokenizer.decode(new_ids)


def main(argv=None) -> int:
    return cli.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
