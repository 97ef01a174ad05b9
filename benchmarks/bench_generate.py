"""Recurrent generation speed (issues 4, 17): tokens/s of ``step`` at batch 1 and 16, prompt prefill,
and parity of the recurrent logits with the parallel path.

For each config (random weights): tokens/s of the recurrent step at each batch size, in fp32 and with
bf16 weights (on CUDA each also captured in a CUDA graph, rows ``fp32 graph`` and ``bf16 graph``, the
other rows uncaptured; on a CPU fp32 also without the fused step ops, row ``fp32 unfused``), timed
interleaved with three passes over the same weight matrices that do nothing else:

* ``bare``: one ``torch.mm`` per matrix, the issue's bound (ATen runs a matrix-vector product on one
  core, so this is one core's matrix-vector speed, not the memory's);
* ``decoder matvec``: the step's own matrix products (split over the cores where that is bitwise
  exact, see ``RecurrentDecoder._mats_for``), so ``decoder_matvec_over_step`` is the share of the step
  spent in matrix products, and the rest is per-token overhead;
* ``read``: ``torch.sum`` of one contiguous copy of every weight byte (all threads), the rate at which
  this machine can read every weight once.  ``reads_per_s`` is its inverse and ``decode_over_read``
  the step's rate over it (token steps per second over weight reads per second; at batch 1 the
  issue-17 ratio, whose target is 0.9).

Also the prefill of a long prompt via the parallel path vs. feeding it token by token, and a profile of
the fp32 batch-1 step (where the time goes), and last the parity check: each model, its LIF-driving
matrices scaled up so that its neurons fire (a default-initialised model never reaches the
threshold), runs ``--parity-tokens`` tokens of 2 sequences through the parallel path (its
default kernels, and on a GPU also the reference ones) and through the recurrent decoder; the largest
logit difference must stay within ``PARITY_TOL``.  The same tokens also run through a decoder that
captures its step in a CUDA graph and through the uncaptured eager step: the graph must give bitwise
the eager step's logits and states (on a CPU, where nothing is captured, the row says so).  Results go to
``benchmarks/results/bench_generate-DATE-COMMIT.{json,md}``, or to ``--out PATH`` (JSON, and the
tables beside it as ``.md``).

    python benchmarks/bench_generate.py                       # 45m and 216m, batch 1 and 16
    python benchmarks/bench_generate.py --threads 1           # on a busy machine (see below)
    python benchmarks/bench_generate.py --smoke               # tiny sizes, seconds (CI)

On a CPU shared with other processes, OpenMP's spin-waiting makes multi-threaded matmuls erratic
(10-100x slower at times): ``--threads 1`` gives stable numbers there.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import header, write_json_md, write_result  # noqa: E402
from spikegpt import ModelConfig, SpikeGPT, ops  # noqa: E402
from spikegpt.config import preset  # noqa: E402
from spikegpt.recurrent import RecurrentDecoder, _mm  # noqa: E402

SMOKE = {"smoke": dict(n_layer=2, n_embd=64, vocab_size=256)}
# Recurrent vs parallel logits: the products are blocked differently (and the kernels sum in another
# order), an ulp or so per layer; a flipped spike would move logits by O(1).
PARITY_TOL = 1e-4


def build(name, device):
    overrides = SMOKE[name] if name in SMOKE else preset(name)[0]
    cfg = ModelConfig(**{**overrides, "ctx_len": overrides.get("ctx_len", 64)})
    torch.manual_seed(0)
    with torch.device(device):
        model = SpikeGPT(cfg)
    return model.eval()


def matrices(model, dtype):
    """The weight matrices a step streams, in step order, as the (in, out) views the step uses."""
    mats = []
    for block in model.blocks:
        mats += [block.att.key, block.att.value, block.att.receptance, block.att.output,
                 block.ffn.key, block.ffn.receptance, block.ffn.value]
    mats.append(model.head)
    return [m.weight.detach().to(dtype).t() for m in mats]


def bare_pass(mats, batch, dtype, device):
    xs = {w.shape[0]: torch.randn(batch, w.shape[0], device=device).to(dtype) for w in mats}

    def run():
        for w in mats:
            torch.mm(xs[w.shape[0]], w)
    return run


def decoder_matvec_pass(decoder, batch, device):
    """The matrix products of one ``decoder`` step at ``batch``, with nothing in between."""
    mats = decoder._mats_for(batch)
    # inputs: (in, out) matrices, (P, in, n) blocks, or oneDNN-packed (out, in) weights
    width = [m[0].shape[1] if m[0].is_mkldnn else m[0].shape[-2] for m in mats]
    xs = {n: torch.randn(batch, n, device=device) for n in width}

    def run():
        with torch.inference_mode():
            for n, m in zip(width, mats):
                _mm(xs[n], m, decoder.cast)
    return run


def read_pass(mats):
    """Read every weight byte once: ``torch.sum`` (all threads) of one contiguous copy of them all, so
    that no per-matrix call overhead counts."""
    flat = torch.cat([w.reshape(-1) for w in mats])
    return lambda: flat.sum()


@torch.no_grad()
def parity(model, device, tokens, batch=2, scale=12.0):
    """Recurrent vs parallel logits on ``model`` with its LIF-driving matrices scaled by ``scale``
    (in place: call it last), for the parallel path's default kernels and, on a GPU, the reference's."""
    for block in model.blocks:
        block.att.output.weight.mul_(scale)
        block.ffn.value.weight.mul_(scale)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, tokens), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    decoder = RecurrentDecoder(model, cuda_graph="off")
    decoder.collect_spikes = True
    recurrent, _ = run_steps(decoder, model, idx)
    rate = float(decoder.spike_counts.sum()) / (decoder.spike_steps * 2 * cfg.n_layer * cfg.n_embd)
    rows = []
    for kernels in ["auto"] + (["torch"] if device.type == "cuda" else []):
        with ops.use_backend(kernels):
            parallel = model(idx)
        err = (recurrent - parallel).abs()
        rows.append({"parallel_kernels": kernels, "tokens": tokens, "batch": batch, "lif_scale": scale,
                     "firing_rate": rate, "max_abs_err": float(err.max()),
                     "max_abs_logit": float(parallel.abs().max()),
                     "positions_over_tol": int((err.amax(-1) > PARITY_TOL).sum()),
                     "argmax_agree": float((recurrent.argmax(-1) == parallel.argmax(-1)).float().mean()),
                     "tol": PARITY_TOL, "ok": bool(err.max() <= PARITY_TOL)})
    return rows, idx, parallel


def run_steps(decoder, model, idx):
    """Logits (B, T, V) and states (T, n_layer, 7, B, C) of ``decoder`` stepping through ``idx``."""
    state, logits, states = model.initial_state(idx.shape[0]), [], []
    for t in range(idx.shape[1]):
        out, state = decoder.step(idx[:, t], state)
        logits.append(out)
        states.append(state)
    return torch.stack(logits, 1), torch.stack(states)


@torch.no_grad()
def graph_check(model, idx, parallel):
    """A CUDA-graph decoder vs the uncaptured eager step (bitwise) and the parallel logits, on ``idx``.

    ``ok``: captured, bitwise, within ``PARITY_TOL``; None off CUDA (nothing captured, nothing measured)."""
    graphed = RecurrentDecoder(model, cuda_graph="auto")
    got = run_steps(graphed, model, idx)
    want = run_steps(RecurrentDecoder(model, cuda_graph="off", script=False), model, idx)
    captured = graphed.graph_fallback is None
    bitwise = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])) if captured else None
    err = float((got[0] - parallel).abs().max())
    return {"tokens": idx.shape[1], "batch": idx.shape[0], "captured": captured, "fallback": graphed.graph_fallback,
            "bitwise_eager": bitwise, "max_abs_err_parallel": err, "tol": PARITY_TOL,
            "ok": bool(bitwise and err <= PARITY_TOL) if captured or idx.device.type == "cuda" else None}


def modes(device, bf16: bool):
    """The decoders timed: (label, weight dtype, exact_batches, cuda_graph).  "fp32 exact" batches use
    the parallel path's own (MKL) products instead of oneDNN's, the price of bitwise equality with it
    (batch 1 is the same as fp32; a CPU matter); on CUDA each weight dtype also runs in a CUDA graph.
    On a CPU "fp32" is also timed without the fused step ops, interleaved with it (row "fp32 unfused")."""
    weights = [("fp32", None)] + ([("bf16", torch.bfloat16)] if bf16 else [])
    if device.type == "cuda":
        return [(label + graph, wd, False, "on" if graph else "off") for label, wd in weights
                for graph in ("", " graph")]
    return [("fp32", None, False, "off"), ("fp32 exact", None, True, "off")] + [
        (label, wd, False, "off") for label, wd in weights[1:]]


def graph_speedup(runs):
    """Each captured run's tokens/s (and fraction of the weight-read rate) against the uncaptured run
    of the same config, weights and batch."""
    eager = {(r["config"], r["weights"], r["batch"]): r for r in runs if not r["cuda_graph"]}
    rows = []
    for g in runs:
        weights = g["weights"].removesuffix(" graph")
        e = eager.get((g["config"], weights, g["batch"]))
        if g["cuda_graph"] and e is not None:
            rows.append({"config": g["config"], "weights": weights, "batch": g["batch"],
                         "graph_tokens_per_s": g["tokens_per_s"], "eager_tokens_per_s": e["tokens_per_s"],
                         "speedup": g["tokens_per_s"] / e["tokens_per_s"], "graph_over_read": g["decode_over_read"],
                         "eager_over_read": e["decode_over_read"]})
    return rows


def fused_speedup(runs):
    """The fused fp32 step's tokens/s (and fraction of the weight-read rate) against the unfused one of
    the same config and batch (where the fused ops ran)."""
    unfused = {(r["config"], r["batch"]): r for r in runs if r["weights"] == "fp32 unfused"}
    return [{"config": r["config"], "batch": r["batch"], "fused_tokens_per_s": r["tokens_per_s"],
             "unfused_tokens_per_s": u["tokens_per_s"], "speedup": r["tokens_per_s"] / u["tokens_per_s"],
             "fused_over_read": r["decode_over_read"], "unfused_over_read": u["decode_over_read"]}
            for r in runs if r["weights"] == "fp32" and r["fused_step"]
            for u in [unfused.get((r["config"], r["batch"]))] if u is not None]


def seconds(fn, device):
    """Wall time of one call of ``fn`` (on a GPU, until its kernels have finished)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def interleaved(fns, device, iters):
    """Best-of-``iters`` seconds per call of each function, timed alternately so that all see the
    same machine load (on a shared machine the minimum is the least disturbed run)."""
    for _ in range(2):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], seconds(fn, device))
    return best


def profile_step(decoder, state, tokens, steps=5):
    from torch.profiler import ProfilerActivity, profile
    decoder.step(tokens, state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decoder.step(tokens, state)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return {"top_ops": [{"op": e.key, "self_pct": round(100 * e.self_cpu_time_total / total, 1),
                         "calls_per_step": e.count // steps} for e in rows[:8]],
            "ops_per_step": sum(e.count for e in rows) // steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="45m,216m")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement (best of, interleaved with the bare pass)")
    p.add_argument("--prefill-len", type=int, default=1000)
    p.add_argument("--prefill-configs", default="45m,216m", help="configs that get the prefill comparison")
    p.add_argument("--parity-tokens", type=int, default=32, help="tokens of the recurrent/parallel parity check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI smoke test)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", help="JSON path (the tables are written beside it as .md) instead of benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.configs, args.prefill_configs, args.prefill_len, args.steps = "smoke", "smoke", 16, 3
        args.parity_tokens = min(args.parity_tokens, 8)
    device = torch.device(args.device)
    result = header(device) | {"benchmark": "bench_generate", "smoke": args.smoke, "threads": torch.get_num_threads(),
                               "runs": [], "prefill": [], "parity": [], "cuda_graph": []}
    lines = [f"# bench_generate — {result['device']} — {result['date']} — {result['commit']}", "",
             "Times per step in ms; `x/step` is that pass's time over the step's (1.0: the step costs "
             "no more than the pass alone); GB/s is weight bytes over step time; read/step is the "
             "step's rate over the rate of reading every weight once (token steps/s over reads/s).", "",
             "| config | weights | batch | step | tokens/s | bare mm | bare/step | decoder matvec | "
             "matvec/step | read | read/step | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        model = build(name, device)
        with torch.no_grad():
            for mode, wd, exact, graph in modes(device, not args.no_bf16):
                dtype = wd or torch.float32
                decoders = [(mode, RecurrentDecoder(model, wd, exact_batches=exact, cuda_graph=graph))]
                if mode == "fp32" and decoders[0][1].fused_step:  # the same step, bitwise, op by op
                    decoders.append(("fp32 unfused", RecurrentDecoder(model, wd, cuda_graph=graph, fused=False)))
                mats = matrices(model, dtype)
                nbytes = sum(w.numel() * w.element_size() for w in mats)
                for batch in [int(b) for b in args.batches.split(",")]:
                    if exact and batch == 1:
                        continue
                    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
                    # Settles which products are split at this batch size (or captures); the steps are
                    # timed from its state, as in a decode loop (from the initial state every layer's
                    # e^{o-K} underflows, a slower path of exp).
                    states = [dec.step(tokens, model.initial_state(batch))[1] for _, dec in decoders]
                    times = interleaved(
                        [bare_pass(mats, batch, dtype, device), decoder_matvec_pass(decoders[0][1], batch, device),
                         read_pass(mats)] + [lambda d=dec, s=st: d.step(tokens, s) for (_, dec), st in zip(decoders, states)],
                        device, args.steps)
                    t_bare, t_mv, t_read = times[:3]
                    for (label, decoder), state, t_step in zip(decoders, states, times[3:]):
                        run = {"config": name, "weights": label, "batch": batch,
                               "step_ms": t_step * 1e3, "tokens_per_s": batch / t_step,
                               "bare_matvec_ms": t_bare * 1e3, "bare_over_step": t_bare / t_step,
                               "decoder_matvec_ms": t_mv * 1e3, "decoder_matvec_over_step": t_mv / t_step,
                               "read_ms": t_read * 1e3, "reads_per_s": 1 / t_read,
                               "decode_over_read": t_read / t_step,
                               "split_products": sum(len(m) > 1 for m in decoder._mats_for(batch)),
                               "products": len(mats), "weight_bytes": nbytes, "step_GBps": nbytes / t_step / 1e9,
                               "cuda_graph": decoder.graph_fallback is None, "fused_step": decoder.fused_step}
                        if label in ("fp32", "fp32 unfused", "fp32 graph") and batch == 1:
                            run["profile"] = profile_step(decoder, state, tokens)
                        result["runs"].append(run)
                        shown = label if run["cuda_graph"] or graph == "off" else f"{label} (not captured)"
                        lines.append(f"| {name} | {shown} | {batch} | {run['step_ms']:.2f} | "
                                     f"{run['tokens_per_s']:.1f} | {run['bare_matvec_ms']:.2f} | "
                                     f"{run['bare_over_step']:.2f} | {run['decoder_matvec_ms']:.2f} | "
                                     f"{run['decoder_matvec_over_step']:.2f} | {run['read_ms']:.2f} | "
                                     f"{run['decode_over_read']:.2f} | {run['step_GBps']:.1f} |")
                        print(lines[-1], flush=True)
            if name in args.prefill_configs.split(","):
                T = args.prefill_len
                idx = torch.randint(0, model.config.vocab_size, (1, T), device=device)
                model(idx[:, :16], return_state=True)  # warm-up
                t_par = seconds(lambda: model(idx, return_state=True), device)

                def token_by_token():
                    state = model.initial_state(1)
                    for t in range(T):
                        _, state = model.step(idx[:, t], state)
                t_seq = seconds(token_by_token, device)
                pre = {"config": name, "prompt_tokens": T, "parallel_s": t_par, "token_by_token_s": t_seq,
                       "speedup": t_seq / t_par}
                result["prefill"].append(pre)
                print(f"prefill {name} {T} tokens: parallel {t_par:.2f} s, token by token {t_seq:.2f} s "
                      f"({pre['speedup']:.1f}x)", flush=True)
            rows, idx, parallel = parity(model, device, args.parity_tokens)
            for row in rows:
                result["parity"].append({"config": name, **row})
                print(f"parity {name} (parallel kernels {row['parallel_kernels']}): max |logit diff| "
                      f"{row['max_abs_err']:.2e} (tol {PARITY_TOL:g}), firing rate {row['firing_rate']:.2f}",
                      flush=True)
            for b in (1, idx.shape[0]):
                g = {"config": name, **graph_check(model, idx[:b], parallel[:b])}
                result["cuda_graph"].append(g)
                print(f"CUDA graph {name} batch {b}: " + (
                    f"bitwise the eager step: {g['bitwise_eager']}, max |logit diff| vs parallel "
                    f"{g['max_abs_err_parallel']:.2e}" if g["captured"] else f"not captured ({g['fallback']})"),
                    flush=True)
        del model
    result["graph_speedup"] = graph_speedup(result["runs"])
    result["fused_speedup"] = fused_speedup(result["runs"])
    scaling = {}
    for run in result["runs"]:
        scaling.setdefault((run["config"], run["weights"]), {})[run["batch"]] = run["tokens_per_s"]
    result["batch_scaling"] = [{"config": c, "weights": w, "batch": b, "over_batch_1": tps / by[1]}
                               for (c, w), by in scaling.items() if 1 in by for b, tps in by.items() if b != 1]
    if result["batch_scaling"]:
        lines += ["", "Tokens/s over batch 1's: " + ", ".join(
            f"{r['config']} {r['weights']} batch {r['batch']} {r['over_batch_1']:.2f}x" for r in result["batch_scaling"])]
    lines += ["", "Batch-1 decoding over the rate of reading every weight once (issue 17, target 0.9): " + ", ".join(
        f"{r['config']} {r['weights']} {r['tokens_per_s']:.1f} tokens/s vs {r['reads_per_s']:.0f} reads/s = "
        f"{r['decode_over_read']:.2f}" for r in result["runs"] if r["batch"] == 1)]
    fused_vs = result["fused_speedup"]
    if fused_vs:
        lines += ["", "Fused CPU step vs unfused (the same step, bitwise): " + ", ".join(
            f"{r['config']} batch {r['batch']} {r['fused_tokens_per_s']:.1f} vs {r['unfused_tokens_per_s']:.1f} "
            f"tokens/s = {r['speedup']:.2f}x, read/step {r['fused_over_read']:.2f} vs {r['unfused_over_read']:.2f}"
            for r in fused_vs)]
    lines += ["", "CUDA graph vs uncaptured steps: " + (", ".join(
        f"{r['config']} {r['weights']} batch {r['batch']} {r['graph_tokens_per_s']:.0f} vs {r['eager_tokens_per_s']:.0f} "
        f"tokens/s = {r['speedup']:.2f}x" for r in result["graph_speedup"]) or
        "not measured (" + "; ".join(sorted({g["fallback"] for g in result["cuda_graph"] if g["fallback"]})) + ")")]
    lines += ["", "| config | prompt tokens | parallel s | token-by-token s | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['prompt_tokens']} | {r['parallel_s']:.2f} | {r['token_by_token_s']:.2f} | "
              f"{r['speedup']:.1f}x |" for r in result["prefill"]]
    lines += ["", "Recurrent vs parallel logits (LIF-driving matrices scaled so that neurons fire):", "",
              "| config | parallel kernels | tokens x batch | firing rate | max abs diff | max abs logit | "
              "argmax agree | within tol |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['parallel_kernels']} | {r['tokens']} x {r['batch']} | {r['firing_rate']:.2f} | "
              f"{r['max_abs_err']:.2e} | {r['max_abs_logit']:.1f} | {r['argmax_agree']:.3f} | "
              f"{'yes' if r['ok'] else 'NO'} (tol {r['tol']:g}) |" for r in result["parity"]]
    lines += ["", "The same tokens through a CUDA-graph decoder, against the uncaptured eager step (bitwise) and the "
              "parallel path:", "", "| config | tokens x batch | captured | bitwise eager | max abs diff parallel | ok |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {g['config']} | {g['tokens']} x {g['batch']} | {'yes' if g['captured'] else 'no: ' + g['fallback']} | "
              f"{'-' if g['bitwise_eager'] is None else 'yes' if g['bitwise_eager'] else 'NO'} | "
              f"{g['max_abs_err_parallel']:.2e} | {'-' if g['ok'] is None else 'yes' if g['ok'] else 'NO'} |"
              for g in result["cuda_graph"]]
    for run in result["runs"]:
        if "profile" in run:
            lines += ["", f"Profile, {run['config']} {run['weights']} batch 1 ({run['profile']['ops_per_step']} "
                      "aten ops per step): " + ", ".join(f"{o['op']} {o['self_pct']}%" for o in run["profile"]["top_ops"])]
    if args.out:
        print(f"wrote {write_json_md(args.out, result, chr(10).join(lines))}")
    elif not args.no_write:
        print(f"wrote {write_result('bench_generate', result, chr(10).join(lines))}")
    return result


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(r["ok"] for r in result["parity"]) and all(g["ok"] is not False for g in result["cuda_graph"])
             else 1)
