"""Sampling, streaming, stop strings, the generate.py CLI and python -m spikegpt.convert."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spikegpt
from spikegpt import ModelConfig, SpikeGPT
from spikegpt.checkpoint import save_model
from spikegpt.generate import (StreamDecoder, _TextStream, filter_logits, generate, main, sample_next,
                               start_token, truncate_at_stop)
from spikegpt.tokenizer import ByteTokenizer, CharTokenizer

REPO = Path(__file__).resolve().parents[1]
CHARS = "abcdefgh \n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    model = SpikeGPT(ModelConfig(vocab_size=vocab, n_layer=2, n_embd=32)).eval()
    with torch.no_grad():  # make it fire
        for name, p in model.named_parameters():
            if name.endswith(("att.output.weight", "ffn.value.weight")):
                p.mul_(10)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    save_model(d / "byte.pt", tiny_model(256), ByteTokenizer())
    run = d / "run"
    run.mkdir()
    tok = CharTokenizer(list(CHARS))
    save_model(run / "ckpt-00000001.pt", tiny_model(tok.vocab_size, seed=1), tok)
    save_model(run / "ckpt-00000002.pt", tiny_model(tok.vocab_size, seed=2), tok)  # newest
    return {"byte": d / "byte.pt", "run": run, "char_model": tiny_model(tok.vocab_size, seed=2)}


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=4)) == [True] * 4
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.79)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=1e-6)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [False, True, False, True]
    # Ties at the k-th value are all kept.
    assert kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)) == [False, True, True, False]


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = torch.log(probs).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, top_k=None, top_p=0.81, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expect = torch.tensor([0.0, 0.5, 0.15, 0.3], dtype=torch.float64) / 0.95
    assert (freq - expect).abs().max() < 0.015
    assert torch.equal(sample_next(logits[:3], 0.0), torch.tensor([1, 1, 1]))  # greedy
    draws = sample_next(logits, 1.0, top_k=1, generator=g)
    assert draws.eq(1).all()


def test_same_seed_same_tokens_and_batch_consistency(ckpts):
    model = ckpts["char_model"]
    run = lambda seed, n=1: generate(model, [1, 2, 3], 40, 1.0, None, 0.9,  # noqa: E731
                                     torch.Generator().manual_seed(seed), num_samples=n)
    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert len(a) == 1 and len(a[0]) == 40
    greedy = generate(model, [1, 2, 3], 30, 0.0, num_samples=3)
    assert greedy[0] == greedy[1] == greedy[2]
    # The greedy continuation is the argmax of the parallel model over prompt + continuation.
    idx = torch.tensor([[1, 2, 3] + greedy[0]])
    with torch.no_grad():
        par = model(idx)[0, 2:-1].argmax(-1).tolist()
    assert par == greedy[0]


def test_generate_restores_training_mode_and_empty_prompt(ckpts):
    model = ckpts["char_model"].train()
    out = generate(model, [], 5, 0.0)
    assert model.training and len(out[0]) == 5
    model.eval()
    assert start_token(CharTokenizer(list(CHARS))) == 0
    assert start_token(ByteTokenizer()) == 10
    assert start_token(None) == 10 and start_token(None, 97) == 0


# ---------------------------------------------------------------------------------------------------
# Text: streaming and stop strings
# ---------------------------------------------------------------------------------------------------
TEXT = "héllo wörld € 😀 ok ✓"


def test_byte_stream_never_emits_half_a_character():
    dec = StreamDecoder(ByteTokenizer())
    pieces = [dec.push(b) for b in TEXT.encode("utf-8")]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == TEXT
    # The first byte of a 4-byte emoji emits nothing until the character is complete.
    dec = StreamDecoder(ByteTokenizer())
    emoji = "😀".encode("utf-8")
    assert [dec.push(b) for b in emoji] == ["", "", "", "😀"]
    dec.push(0xE2)  # a truncated character at the end becomes U+FFFD on flush
    assert dec.flush() == "\ufffd"


def test_bpe_stream_never_emits_half_a_character():
    pytest.importorskip("tokenizers")
    from spikegpt.tokenizer import train_bpe
    tok = train_bpe(["hello world"] * 5, vocab_size=270)  # emoji and accents stay split in bytes
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT) // 2
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == TEXT


def test_char_stream_and_stop_holdback():
    tok = CharTokenizer(list(CHARS))
    ts = _TextStream(tok, ["bad", "h"])
    ids = tok.encode("ab ba")
    pieces = [ts.push(i) for i in ids]
    # "b" and "ba" could begin "bad": held back until disproved.
    assert [p for p, _ in pieces] == ["a", "", "b ", "", ""]
    piece, done = ts.push(tok.encode("d")[0])
    assert (piece, done) == ("", True)
    ts = _TextStream(tok, ["bad"])
    got = "".join(ts.push(i)[0] for i in tok.encode("ab bag")) + ts.flush()
    assert got == "ab bag"
    assert truncate_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert truncate_at_stop("abc", []) == ("abc", False)


def test_stop_strings_end_each_sample(ckpts):
    model = ckpts["char_model"]
    tok = CharTokenizer(list(CHARS))
    full = generate(model, [1], 60, 0.0, tokenizer=tok)[0]
    text = tok.decode(full)
    stop = text[20:22]
    cut = text.find(stop)
    got = generate(model, [1], 60, 0.0, tokenizer=tok, stop=[stop], num_samples=2)
    for ids in got:
        assert ids == full[:cut + len(stop)]
        assert truncate_at_stop(tok.decode(ids), [stop]) == (text[:cut], True)
    streamed = []
    generate(model, [1], 60, 0.0, tokenizer=tok, stop=[stop], on_text=lambda b, s: streamed.append(s))
    assert "".join(streamed) == text[:cut]


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def test_cli_subprocess_run_dir_seeded(ckpts):
    cmd = [sys.executable, str(REPO / "generate.py"), "--ckpt", str(ckpts["run"]), "--prompt", "ab",
           "--max-new-tokens", "30", "--seed", "3", "--top-k", "5", "--spike-stats", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    a = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    b = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ab")
    assert "tokens/s" in a.stderr and "att-LIF" in a.stderr
    # The newest checkpoint of the run directory is the one used.
    tok = CharTokenizer(list(CHARS))
    ids = generate(ckpts["char_model"], tok.encode("ab"), 30, 1.0, 5, None, torch.Generator().manual_seed(3))
    assert a.stdout == "ab" + tok.decode(ids[0]) + "\n"


def test_cli_stream_equals_batch_output(ckpts, capsys, monkeypatch):
    args = ["--ckpt", str(ckpts["byte"]), "--prompt", "Hi", "--max-new-tokens", "40", "--seed", "5"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--cuda-graph", "off"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--bf16-weights", "--kernels", "torch"]) == 0
    assert main(args + ["--num-samples", "3", "--stop", "x"]) == 0
    assert plain.startswith("Hi")
    capsys.readouterr()
    monkeypatch.setattr("spikegpt.recurrent._ONEDNN_MIN_SIZE", 0)  # this small model's batches use oneDNN too
    assert main(args + ["--num-samples", "3"]) == 0
    onednn = capsys.readouterr().out
    assert main(args + ["--num-samples", "3", "--exact-batches"]) == 0
    assert capsys.readouterr().out == onednn  # products an ulp apart: the same samples here


def test_cli_errors(ckpts, capsys, tmp_path):
    assert main(["--ckpt", str(ckpts["run"]), "--prompt", "abz!"]) == 2
    err = capsys.readouterr().err
    assert "'z'" in err and "'!'" in err
    assert main(["--ckpt", str(ckpts["run"]), "--tokenizer", "byte", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "256" in err and "10" in err
    assert main(["--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--ckpt", str(ckpts["run"]), "--max-new-tokens", "5", "--seed", "0"]) == 0  # empty prompt
    assert len(capsys.readouterr().out) >= 1
    assert main(["--ckpt", str(ckpts["byte"]), "--stream", "--num-samples", "2"]) == 2
    capsys.readouterr()
    assert main(["--ckpt", str(ckpts["byte"]), "--device", "cpu", "--cuda-graph", "on"]) == 2
    assert capsys.readouterr().err == ("error: --cuda-graph on needs a CUDA device, the model is on cpu: pass "
                                       "--device cuda, or --cuda-graph auto\n")


def test_convert_and_reference_cli(shared_reference, tmp_path, capsys):
    from spikegpt.convert import main as convert_main
    pth, cfg = shared_reference / "tiny_l2_v77.pth", shared_reference / "tiny_l2_v77.json"
    out = tmp_path / "conv.pt"
    assert convert_main([str(pth), "--config", str(cfg), "--out", str(out), "--v-threshold", "0.9"]) == 0
    model = spikegpt.load(out)
    ref = spikegpt.from_reference(pth, {**__import__("json").loads(cfg.read_text()), "v_threshold": 0.9})
    assert model.config.v_threshold == 0.9
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    chars = CharTokenizer([chr(32 + i) for i in range(77)])
    tok_json = tmp_path / "tok.json"
    tok_json.write_text(__import__("json").dumps(chars.to_dict()))
    capsys.readouterr()
    assert main(["--reference", str(pth), "--reference-config", str(cfg), "--tokenizer", str(tok_json),
                 "--prompt", "AB", "--max-new-tokens", "8", "--seed", "1", "--no-binary-embedding"]) == 0
    assert capsys.readouterr().out.startswith("AB")
    assert convert_main([str(pth), "--config", str(tmp_path / "nope.json"), "--out", str(out)]) == 2


def test_closing_line_says_how_cuda_steps_ran():
    from types import SimpleNamespace

    from spikegpt.generate import _graph_note
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _graph_note(SimpleNamespace(graph_fallback=None, graph_captures=1), cuda) == ", CUDA graph"
    assert _graph_note(SimpleNamespace(graph_fallback="capture failed (X: y)", graph_captures=0),
                       cuda) == ", without CUDA graph: capture failed (X: y)"
    assert _graph_note(SimpleNamespace(graph_fallback="CUDA graphs need a CUDA device", graph_captures=0), cpu) == ""
