"""Sharded token datasets, document-corpus preparation (parallel, resumable), WikiText counts, metrics,
and BPE tokenizer training. Self-contained: a tiny tokenizer is trained here; the GPT-NeoX file in
../shared/reference is used only where noted (skipped when absent)."""
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from spikegpt.data import (DataError, ShardedTokens, check_dataset, find_inputs, is_val_document, load_meta,
                           load_tokenizer, open_split, prepare_documents, sample_batch, val_hash_fraction)
from spikegpt.metrics import count_lines, count_words, unit_metrics
from spikegpt.tokenizer import EOT_TOKEN, BPETokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]

zstandard = pytest.importorskip("zstandard", reason="zstandard not installed (pip install zstandard)")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "data" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORDS = ("the of and to in is was for on as with by that at from his it an were are which this be "
         "model spike neuron token layer train data language recurrent state value time step memory "
         "über café naïve 東京 😀").split()


def _doc(rng, n_words):
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(3, 15))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus: 2 .jsonl.zst, 1 .jsonl (with a blank line and an empty doc), 2 .txt in a subdir."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    docs = {}
    for i in range(2):
        texts = [_doc(rng, rng.randint(5, 120)) for _ in range(60)]
        docs[f"a{i}.jsonl.zst"] = texts
        raw = "".join(json.dumps({"text": t, "meta": {"i": j}}) + "\n" for j, t in enumerate(texts)).encode()
        (root / f"a{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    texts = [_doc(rng, rng.randint(5, 120)) for _ in range(50)]
    docs["b.jsonl"] = texts
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(10, "")                              # blank line: skipped
    lines.insert(20, json.dumps({"text": ""}))        # empty document: skipped and counted
    (root / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "sub").mkdir()
    for i in range(2):
        t = _doc(rng, 400)
        docs[f"sub/c{i}.txt"] = [t]
        (root / "sub" / f"c{i}.txt").write_text(t, encoding="utf-8")
    return root, docs


@pytest.fixture(scope="module")
def tiny_tok(corpus, tmp_path_factory):
    root, _ = corpus
    train = _load_script("train_tokenizer")
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    assert train.main(["--input", str(root), "--vocab-size", "400", "--out", str(out)]) == 0
    return out


def _all_bytes(d):
    meta = load_meta(d)
    return {f: (Path(d) / f).read_bytes() for s in meta["splits"].values() for f in [x["file"] for x in s["files"]]}


def _expected_stream(corpus_docs, root, tok, val_fraction):
    """Reference implementation: input order, each doc + EOT, hash rule."""
    out = {"train": [], "val": []}
    for path, name in find_inputs([root]):
        rel = name.split("/", 1)[1]
        for t in corpus_docs[rel]:
            if not t:
                continue
            out["val" if is_val_document(t, val_fraction) else "train"].extend(tok.encode(t) + [tok.eot_id])
    return out


# ---------------------------------------------------------------------------------------------------
# Sharded reads
# ---------------------------------------------------------------------------------------------------
def test_sharded_tokens_slices_equal_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50000, n).astype("<u2") for n in (7, 1, 13, 5)]
    shards = []
    for i, p in enumerate(parts):
        f = tmp_path / f"s{i}.bin"
        p.tofile(f)
        shards.append(np.memmap(f, dtype="<u2", mode="r", shape=(len(p),)))
    st = ShardedTokens(shards)
    ref = np.concatenate(parts)
    assert len(st) == len(ref) == st.shape[0] and st.dtype == np.dtype("<u2")
    for a in range(len(ref) + 1):
        for b in range(a, len(ref) + 2):
            assert np.array_equal(np.asarray(st[a:b]), ref[a:b]), (a, b)
    assert np.array_equal(np.asarray(st[-5:]), ref[-5:]) and np.array_equal(np.asarray(st), ref)
    assert [int(st[i]) for i in range(len(ref))] == ref.tolist() and int(st[-1]) == int(ref[-1])
    with pytest.raises(IndexError):
        st[len(ref)]
    # within one shard: a view of the memmap (no copy)
    assert isinstance(st[8:12], np.memmap)


def test_sharded_dataset_sampling_and_eval(corpus, tiny_tok, tmp_path):
    root, docs = corpus
    out = tmp_path / "ds"
    meta = prepare_documents([root], out, tiny_tok, val_fraction=0.2, shard_tokens=997, workers=1, progress=False,
                             log=None)
    assert meta["version"] == 2 and meta["dtype"] == "uint16" and len(meta["splits"]["train"]["files"]) > 3
    check_dataset(out)
    train = open_split(out, "train")
    assert isinstance(train, ShardedTokens)
    ref = np.concatenate([np.fromfile(out / f["file"], dtype="<u2") for f in meta["splits"]["train"]["files"]])
    assert len(train) == len(ref) == meta["splits"]["train"]["tokens"]
    x, y = sample_batch(train, 16, 100, seed=3, step=5, rank=1)
    x2, y2 = sample_batch(torch.from_numpy(ref.astype(np.int64)), 16, 100, seed=3, step=5, rank=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.int64
    windows = [np.asarray(train[a:a + 300]) for a in range(0, len(train), 300)]  # across shard boundaries
    assert np.concatenate(windows).tolist() == ref.tolist()
    assert len(open_split(out, "val")) == meta["splits"]["val"]["tokens"] and load_tokenizer(out).eot_id == 0
    # evaluate_tokens works on it unchanged
    from spikegpt.evaluate import evaluate_tokens

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, state=None, return_state=False):
            logits = torch.zeros(*x.shape, 400) + self.p
            return logits, torch.zeros(1, 1, x.shape[0])

    r = evaluate_tokens(Uniform(), train, window=128, carry_state=False, streams=2, max_tokens=2000)
    assert r["predicted_tokens"] == 2000 and r["bits_per_token"] == pytest.approx(math.log2(400), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# prepare_openwebtext2
# ---------------------------------------------------------------------------------------------------
def test_prepare_documents_content_workers_and_hash_split(corpus, tiny_tok, tmp_path):
    root, docs = corpus
    tok = BPETokenizer(tiny_tok)
    o1, o2 = tmp_path / "w1", tmp_path / "w2"
    m1 = prepare_documents([root], o1, tok, val_fraction=0.25, shard_tokens=1000, workers=1, batch_docs=7,
                           progress=False, log=None)
    prepare_documents([root], o2, tok, val_fraction=0.25, shard_tokens=1000, workers=2, batch_docs=7,
                           progress=False, log=None)
    assert (o1 / "meta.json").read_bytes() == (o2 / "meta.json").read_bytes()
    assert _all_bytes(o1) == _all_bytes(o2)
    exp = _expected_stream(docs, root, tok, 0.25)
    for s in ("train", "val"):
        assert open_split(o1, s)[:].tolist() == exp[s]
    n_docs = sum(1 for v in docs.values() for t in v if t)
    assert m1["splits"]["train"]["documents"] + m1["splits"]["val"]["documents"] == n_docs
    assert 0 < m1["splits"]["val"]["documents"] < n_docs
    assert m1["documents_skipped_empty"] == 1
    val_texts = [t for v in docs.values() for t in v if t and val_hash_fraction(t) < 0.25]
    assert m1["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in val_texts)
    assert m1["splits"]["val"]["chars"] == sum(len(t) for t in val_texts)
    # every shard but the last of a split has exactly shard_tokens tokens
    for s in ("train", "val"):
        counts = [f["tokens"] for f in m1["splits"][s]["files"]]
        assert all(c == 1000 for c in counts[:-1]) and 0 < counts[-1] <= 1000
    assert load_tokenizer(o1) == tok
    # the hash rule is a function of the text only
    assert is_val_document("hello", 0.5) == (val_hash_fraction("hello") < 0.5)
    assert val_hash_fraction("hello") == val_hash_fraction("hello") and 0 <= val_hash_fraction("x") < 1
    # re-running is a no-op; a different configuration is refused
    again = prepare_documents([root], o1, tok, val_fraction=0.25, shard_tokens=1000, progress=False, log=None)
    assert again["fingerprint"] == m1["fingerprint"]
    with pytest.raises(DataError, match="overwrite"):
        prepare_documents([root], o1, tok, val_fraction=0.3, shard_tokens=1000, progress=False, log=None)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_documents_resume_identical(corpus, tiny_tok, tmp_path, workers):
    root, _ = corpus
    kw = dict(val_fraction=0.2, shard_tokens=700, workers=workers, batch_docs=5, progress=False, log=None)
    ref = tmp_path / "ref"
    prepare_documents([root], ref, tiny_tok, **kw)

    out = tmp_path / "resumed"
    seen = []

    def stop_after_first(name):
        seen.append(name)
        raise _Stop

    with pytest.raises(_Stop):
        prepare_documents([root], out, tiny_tok, on_file_done=stop_after_first, **kw)
    assert not (out / "meta.json").exists()   # not a dataset yet
    with pytest.raises(DataError, match="no meta.json"):
        load_meta(out)
    # simulate a crash in the middle of the next file: junk appended to the open shard + a stray new shard
    shards = sorted(out.glob("train-*.bin"))
    with open(shards[-1], "ab") as f:
        f.write(b"\x07\x00" * 123)
    (out / f"train-{len(shards):05d}.bin").write_bytes(b"\x01\x00" * 50)

    calls = []
    prepare_documents([root], out, tiny_tok, on_file_done=calls.append, **kw)
    assert seen[0] not in calls and len(calls) == len(find_inputs([root])) - 1   # finished file skipped
    assert (out / "meta.json").read_bytes() == (ref / "meta.json").read_bytes()
    assert _all_bytes(out) == _all_bytes(ref)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_prepare_openwebtext2_cli_and_errors(corpus, tiny_tok, tmp_path, capsys):
    root, _ = corpus
    cli = _load_script("prepare_openwebtext2")
    out = tmp_path / "cli"
    assert cli.main(["--input", str(root / "b.jsonl"), str(root / "sub"), "--out", str(out), "--tokenizer",
                     str(tiny_tok), "--workers", "2", "--val-fraction", "0.3", "--shard-tokens", "2_000",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "documents" in text and "MB/s" in text
    meta = load_meta(out)
    assert [i["name"] for i in meta["inputs"]] == ["b.jsonl", "sub/c0.txt", "sub/c1.txt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert cli.main(["--input", str(bad), "--out", str(tmp_path / "x"), "--tokenizer", str(tiny_tok),
                     "--workers", "1", "--no-progress"]) == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err


def test_prepare_documents_refuses_foreign_shard_files(corpus, tiny_tok, tmp_path):
    root, _ = corpus
    out = tmp_path / "o"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"mine")
    kw = dict(val_fraction=0.2, shard_tokens=300, progress=False, log=None)
    with pytest.raises(DataError, match=r"train-00000\.bin.*--overwrite"):
        prepare_documents([root / "b.jsonl"], out, tiny_tok, **kw)
    assert (out / "train-00000.bin").read_bytes() == b"mine"
    prepare_documents([root / "b.jsonl"], out, tiny_tok, overwrite=True, **kw)
    check_dataset(out)


def test_sharded_split_token_ids_checked_against_the_vocabulary(corpus, tiny_tok, tmp_path):
    root, _ = corpus
    out = tmp_path / "ds"
    meta = prepare_documents([root / "b.jsonl"], out, tiny_tok, val_fraction=0.2, shard_tokens=300, progress=False,
                             log=None)
    files = [f["file"] for f in meta["splits"]["train"]["files"]]
    assert len(files) > 2 and meta["vocab_size"] == 400
    assert meta["splits"]["train"]["max_id"] == max(int(np.fromfile(out / f, dtype="<u2").max()) for f in files)
    # A dataset prepared before max_id was stored: the shards are checked by a max over each of them.
    for s in meta["splits"].values():
        del s["max_id"]
    (out / "meta.json").write_text(json.dumps(meta))
    check_dataset(out)
    shard = np.memmap(out / files[1], dtype="<u2", mode="r+")
    shard[7] = 400
    shard.flush()
    del shard
    with pytest.raises(DataError, match=files[1].replace(".", r"\.") + r" holds token id 400 "):
        open_split(out, "train")


def test_prepare_documents_neox_uint16(shared_reference, corpus, tmp_path):
    root, docs = corpus
    tok = BPETokenizer(shared_reference / "20B_tokenizer.json")
    meta = prepare_documents([root / "b.jsonl"], tmp_path / "neox", tok, val_fraction=0.1, shard_tokens=500,
                             workers=2, progress=False, log=None)
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0 and meta["vocab_size"] == 50277
    exp = [i for t in docs["b.jsonl"] if t and not is_val_document(t, 0.1) for i in tok.encode(t) + [0]]
    assert open_split(tmp_path / "neox", "train")[:].tolist() == exp


# ---------------------------------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------------------------------
def test_train_tokenizer_deterministic(corpus, tiny_tok, tmp_path):
    root, _ = corpus
    train = _load_script("train_tokenizer")
    out2 = tmp_path / "again.json"
    assert train.main(["--input", str(root), "--vocab-size", "400", "--out", str(out2)]) == 0
    assert out2.read_bytes() == tiny_tok.read_bytes()
    tok = BPETokenizer(tiny_tok)
    assert tok.vocab_size == 400 and tok.eot_id == 0 and tok.token_to_id(EOT_TOKEN) == 0
    s = "The spike model über 東京 😀 <|endoftext|> x"
    assert tok.decode(tok.encode(s)) == s and 0 in tok.encode(s)
    with pytest.raises(ValueError, match="at least"):
        train_bpe(["abc"], 100)


def test_train_tokenizer_never_replaces_an_input_or_a_file_without_overwrite(corpus, tmp_path, capsys):
    root, _ = corpus
    train = _load_script("train_tokenizer")
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "c0.txt").write_bytes((root / "sub" / "c0.txt").read_bytes())
    before = (src / "c0.txt").read_bytes()
    for out, extra in ((src / "c0.txt", []), (src / "c0.txt", ["--overwrite"])):  # the input itself
        assert train.main(["--input", str(src), "--vocab-size", "300", "--out", str(out), *extra]) == 2
        assert "one of the inputs" in capsys.readouterr().err
    assert (src / "c0.txt").read_bytes() == before
    other = tmp_path / "notes.json"
    other.write_text("{}")
    assert train.main(["--input", str(src), "--vocab-size", "300", "--out", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err and other.read_text() == "{}"
    assert train.main(["--input", str(src), "--vocab-size", "300", "--out", str(other), "--overwrite"]) == 0
    assert BPETokenizer(other).vocab_size == 300


# ---------------------------------------------------------------------------------------------------
# WikiText and metrics
# ---------------------------------------------------------------------------------------------------
WT_TRAIN = (" = Valkyria Chronicles III = \n"
            " \n"
            " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing game . \n")
WT_VALID = " = Homarus = \n \n The lobster is 1 @,@ 000 km long . \n"
WT_TEST = " = Robert = \n Robert was an actor ."   # no final newline


def test_prepare_wikitext_counts(tmp_path):
    src = tmp_path / "wikitext-2-raw"
    src.mkdir()
    (src / "wiki.train.raw").write_text(WT_TRAIN, encoding="utf-8")
    (src / "wiki.valid.raw").write_text(WT_VALID, encoding="utf-8")
    (src / "wiki.test.raw").write_text(WT_TEST, encoding="utf-8")
    cli = _load_script("prepare_wikitext")
    assert cli.main(["--input", str(src), "--out", str(tmp_path / "wt"), "--vocab", "byte"]) == 0
    s = load_meta(tmp_path / "wt")["splits"]
    # hand counts. train: "= Valkyria Chronicles III =" 5 words; "Senjō no Valkyria 3 : Unrecorded Chronicles is
    # a tactical role @-@ playing game ." 15 words; 3 lines; "ō" is 2 bytes / 1 char.
    assert (s["train"]["words"], s["train"]["lines"]) == (20, 3)
    assert s["train"]["bytes"] == len(WT_TRAIN) + 1 and s["train"]["chars"] == len(WT_TRAIN)
    # valid: "= Homarus =" 3; "The lobster is 1 @,@ 000 km long ." 9; 3 lines
    assert (s["val"]["words"], s["val"]["lines"], s["val"]["bytes"]) == (12, 3, len(WT_VALID))
    # test: "= Robert =" 3; "Robert was an actor ." 5; 2 lines (the last unterminated)
    assert (s["test"]["words"], s["test"]["lines"], s["test"]["bytes"]) == (8, 2, len(WT_TEST))
    assert bytes(open_split(tmp_path / "wt", "test")) == WT_TEST.encode()
    assert count_words(b"a  b\tc\n\nd ") == 4 and count_lines(b"") == 0 and count_lines(b"a\nb") == 2
    (src / "wiki.test.raw").unlink()
    with pytest.raises(DataError, match="no test file"):
        cli.prepare_wikitext(src, tmp_path / "wt2", vocab="byte")


def test_unit_metrics_exact():
    for V in (2, 256, 50277):
        n = 1000
        m = unit_metrics(n * math.log(V), n, {"tokens": n, "bytes": 4 * n, "chars": 2 * n, "words": n // 4,
                                              "lines": 10})
        assert m["bits_per_token"] == pytest.approx(math.log2(V), rel=1e-14, abs=0)
        assert m["token_ppl"] == pytest.approx(V, rel=1e-12)
        assert m["bits_per_byte"] == pytest.approx(math.log2(V) / 4, rel=1e-14)
        assert m["bits_per_char"] == pytest.approx(math.log2(V) / 2, rel=1e-14)
        assert m["word_ppl"] == pytest.approx(float(V) ** 4, rel=1e-12)
        assert m["bits_per_word"] == pytest.approx(4 * math.log2(V), rel=1e-14)
    assert unit_metrics(8 * math.log(2), 8)["bits_per_token"] == 1.0
    assert unit_metrics(8 * math.log(2), 8)["token_ppl"] == 2.0
    m = unit_metrics(math.log(3) * 10, 10, {"tokens": 10, "words": 4, "lines": 1}, word_key="words_with_eos")
    assert m["word_ppl"] == pytest.approx(3.0 ** 2, rel=1e-12)
    assert set(unit_metrics(1.0, 1)) == {"nll_per_token", "bits_per_token", "token_ppl"}
    with pytest.raises(ValueError):
        unit_metrics(1.0, 0)
