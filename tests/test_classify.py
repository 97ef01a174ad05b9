"""Sentence classification: formats, bad data, folds, padding, model selection, checkpoints, CLI."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from spikegpt.classify import ClassifyConfig, SentenceClassifier, load_classifier, read_examples, save_classifier
from spikegpt.classify import scratch_lm
from spikegpt.classify.__main__ import main
from spikegpt.spikes import firing_rates, record_spikes
from spikegpt.classify.data import Example, check_labels, detect_format, fold_splits, kfold, label_set, pair_labels
from spikegpt.classify.model import pool
from spikegpt.classify.train import best_epoch, collate, encode, fit, predict_proba, scores
from spikegpt.data import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "classification"
POS = ["good fun movie", "a good film", "fun and good", "great good fun", "good good", "so fun", "good cast",
       "fun fun plot", "good story", "really good"]
NEG = ["bad dull movie", "a bad film", "dull and bad", "awful bad dull", "bad bad", "so dull", "bad cast",
       "dull dull plot", "bad story", "really bad"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def tiny_lm(train=(), **kw):
    torch.manual_seed(0)
    return scratch_lm(train, **{"n_layer": 2, "n_embd": 16, "dropout": 0.0, **kw})


# --------------------------------------------------------------------------------------------------
# Formats.
# --------------------------------------------------------------------------------------------------
def test_formats_are_detected_and_read_alike(tmp_path):
    ls = write(tmp_path / "a.txt", "1 a good film\n0 a bad one\n\n")
    tsv = write(tmp_path / "a.tsv", "sentence\tlabel\na good film\t1\na bad one\t0\n")
    csv_ = write(tmp_path / "a.csv", 'id,text,label\n7,"a good film",1\n8,"a bad one",0\n')
    assert [detect_format(p) for p in (ls, tsv, csv_)] == ["label-sentence", "tsv", "csv"]
    want = [("a good film", "1"), ("a bad one", "0")]
    for p in (ls, tsv, csv_):
        assert [(e.text, e.label) for e in read_examples(p)] == want
    assert read_examples(ls)[1].where == f"{ls}:2"
    # a forced format wins over detection: the header line is then a sentence labelled "sentence\tlabel"
    with pytest.raises(DataError, match=r"a\.tsv:1: cannot parse"):
        read_examples(tsv, "label-sentence")


def test_pair_of_one_class_files(tmp_path):
    pos = write(tmp_path / "rt-polarity.pos", "a good film\nfun\n")
    neg = write(tmp_path / "rt-polarity.neg", "a bad film\n")
    ex = read_examples([pos, neg])
    assert [(e.text, e.label) for e in ex] == [("a good film", "pos"), ("fun", "pos"), ("a bad film", "neg")]
    assert pair_labels(["pos.txt", "neg.txt"]) == ["pos", "neg"]
    assert pair_labels(["x/a.txt", "y/a.txt"]) == ["0", "1"]


def test_string_labels_and_label_order(tmp_path):
    f = write(tmp_path / "s.tsv", "sentence\tlabel\nx\tpositive\ny\tnegative\nz\tneutral\n")
    assert label_set(read_examples(f)) == ["negative", "neutral", "positive"]
    assert label_set([Example("a", "10", ""), Example("b", "9", ""), Example("c", "2", "")]) == ["2", "9", "10"]


# --------------------------------------------------------------------------------------------------
# Bad data: one message naming the file and the line.
# --------------------------------------------------------------------------------------------------
def test_bad_data_messages(tmp_path):
    with pytest.raises(DataError, match=r"bad\.txt:2: cannot parse 'lonely'"):
        read_examples(write(tmp_path / "bad.txt", "1 fine line\nlonely\n"))
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        read_examples(write(tmp_path / "empty.txt", "\n \n"))
    with pytest.raises(DataError, match=r"short\.tsv:3: cannot parse a TSV row with 1 field"):
        read_examples(write(tmp_path / "short.tsv", "sentence\tlabel\nok\t1\nno label here\n"))
    with pytest.raises(DataError, match=r"head\.csv: no examples"):
        read_examples(write(tmp_path / "head.csv", "text,label\n"))
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        read_examples(tmp_path / "missing.txt")
    dev = read_examples(write(tmp_path / "dev.txt", "1 ok\n7 what\n"))
    with pytest.raises(DataError, match=r"dev\.txt:2: label '7' does not occur in the training data"):
        check_labels(dev, ["0", "1"], "train.txt")
    rare = [Example(f"s{i}", "a", f"d.txt:{i + 1}") for i in range(9)] + [Example("t", "b", "d.txt:10")]
    with pytest.raises(DataError, match=r"d\.txt: class 'b' has no example in the .* of fold .*lines 10"):
        fold_splits(rare, 3, 0.1, 0, "d.txt")


def test_long_sentences_are_truncated_and_counted():
    clf = SentenceClassifier(tiny_lm(), ["0", "1"])
    ex = [Example("abcdefgh", "0", ""), Example("abc", "1", ""), Example("abcdef", "1", "")]
    ids, y, truncated = encode(clf, ex, max_len=5)
    assert [len(t) for t in ids] == [5, 3, 5] and y == [0, 1, 1] and truncated == 2


# --------------------------------------------------------------------------------------------------
# Folds.
# --------------------------------------------------------------------------------------------------
def test_folds_are_stratified_disjoint_and_seeded():
    ex = [Example(f"s{i}", "a" if i < 30 else "b", f"f:{i}") for i in range(45)]  # 30 a, 15 b
    folds = kfold(ex, 5, seed=1)
    assert sorted(e.where for f in folds for e in f) == sorted(e.where for e in ex)
    assert [Counter(e.label for e in f) for f in folds] == [Counter(a=6, b=3)] * 5
    assert [e.where for e in kfold(ex, 5, seed=1)[0]] == [e.where for e in folds[0]]
    assert [e.where for e in kfold(ex, 5, seed=2)[0]] != [e.where for e in folds[0]]
    for i, (train, dev, test) in enumerate(fold_splits(ex, 5, 0.2, 1, "f")):
        assert {e.where for e in test} == {e.where for e in folds[i]}
        assert not {e.where for e in train} & ({e.where for e in dev} | {e.where for e in test})
        assert len(train) + len(dev) == 36 and Counter(e.label for e in dev) == Counter(a=5, b=2)


# --------------------------------------------------------------------------------------------------
# Model: pooling, padding invariance.
# --------------------------------------------------------------------------------------------------
def test_pool_reads_real_positions_only():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    lengths = torch.tensor([2, 4])
    assert torch.equal(pool(h, lengths, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.allclose(pool(h, lengths, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


@pytest.mark.parametrize("how", ["mean", "last"])
def test_padding_never_changes_a_prediction(how):
    lm = tiny_lm(v_threshold=0.05)  # a low threshold: the LIF neurons do spike
    clf = SentenceClassifier(lm, ["0", "1", "2"], pool=how).eval()
    ids = [clf.encode(s) for s in ["a longer sentence, with padding after it", "short", "mid length"]]
    with torch.no_grad():
        alone = [clf(*collate(ids, [i], "cpu"))[0] for i in range(3)]
        tokens, lengths = collate(ids, [0, 1, 2], "cpu")
        assert (tokens[1, len(ids[1]):] == 0).all()  # right-padded
        batched = clf(tokens, lengths)
        with record_spikes(lm):
            lm.features(tokens)
        assert firing_rates(lm)["all"] > 0.01
    for i in range(3):
        torch.testing.assert_close(batched[i], alone[i], atol=1e-6, rtol=0)
    assert torch.equal(predict_proba(clf, ids, 2, "cpu").argmax(-1), batched.argmax(-1))


# --------------------------------------------------------------------------------------------------
# Training: selection on dev, scores.
# --------------------------------------------------------------------------------------------------
def test_scores():
    s = scores([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # F1: class 0: 2*1/(2+2)=0.5, class 1: 2*2/(2+3)=0.8, class 2: 0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert s["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_best_epoch_is_the_earliest_best_dev():
    assert best_epoch([0.5, 0.7, 0.6, 0.7]) == 2
    assert best_epoch([0.9]) == 1


def test_fit_leaves_the_weights_of_the_best_dev_epoch():
    ex = [Example(s, "1", "") for s in POS] + [Example(s, "0", "") for s in NEG]
    clf = SentenceClassifier(tiny_lm(), ["0", "1"], dropout=0.0)
    ids, y, _ = encode(clf, ex, 32)
    dev_ids, dev_y = ids[::3], [1 - t for t in y[::3]]  # a dev set with flipped labels: learning hurts it
    history = fit(clf, (ids, y), (dev_ids, dev_y), ClassifyConfig(epochs=4, lr=3e-3, batch_size=4,
                                                                  progress=False), "cpu", log=lambda m: None)
    best = best_epoch([h["dev_accuracy"] for h in history])
    dev_now = scores(dev_y, predict_proba(clf, dev_ids, 8, "cpu").argmax(-1).tolist(), 2)["accuracy"]
    assert best < len(history) and history[-1]["dev_accuracy"] < history[best - 1]["dev_accuracy"]
    assert dev_now == history[best - 1]["dev_accuracy"]  # the best epoch's weights, not the last's


# --------------------------------------------------------------------------------------------------
# Checkpoint round trip and the command line.
# --------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    train = [Example("zebra", "x", ""), Example("yak", "y", "")]
    clf = SentenceClassifier(tiny_lm(train, vocab="char"), ["x", "y"], pool="last").eval()
    save_classifier(clf, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "classifier.pt", weights_only=True)["labels"] == ["x", "y"]
    back, _ = load_classifier(tmp_path / "run")
    ids = [clf.encode(s) for s in ("zebra", "yak", "an unseen ~ character")]
    assert clf.tokenizer.kind == "char" and clf.tokenizer.unk_id in ids[2]
    torch.testing.assert_close(predict_proba(back, ids, 4, "cpu"), predict_proba(clf, ids, 4, "cpu"), atol=0, rtol=0)
    assert (back.labels, back.pool) == (["x", "y"], "last")


def _separable(tmp_path):
    train = write(tmp_path / "train.txt", "".join(f"1 {s}\n0 {t}\n" for s, t in zip(POS * 3, NEG * 3)))
    test = write(tmp_path / "test.txt", "1 good fun\n0 bad dull\n1 fun good film\n0 dull bad film\n")
    return train, test


SMALL = ["--n-layer", "1", "--n-embd", "32", "--epochs", "6", "--lr", "1e-2", "--batch-size", "8",
         "--no-progress", "--device", "cpu"]


def test_cli_trains_saves_predicts_and_evaluates(tmp_path, capsys):
    train, test = _separable(tmp_path)
    out = tmp_path / "res.json"
    assert main(["--train", str(train), "--test", str(test), "--json", str(out), "--out-dir",
                 str(tmp_path / "clf"), *SMALL]) == 0
    res = json.loads(out.read_text())
    assert {"accuracy", "macro_f1", "dev_accuracy", "epochs", "best_epoch", "firing_rates"} <= set(res)
    assert res["accuracy"] >= 0.75 and res["labels"] == ["0", "1"] and len(res["history"]) == 6
    assert {"emb", "att", "ffn", "all"} <= set(res["firing_rates"])
    capsys.readouterr()
    assert main(["predict", "--ckpt", str(tmp_path / "clf"), "good fun good", "bad dull bad"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "0"]
    p = float(lines[0].split("\t")[1])
    assert 0.5 < p <= 1
    assert main(["evaluate", "--ckpt", str(tmp_path / "clf"), "--test", str(test), "--json",
                 str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["accuracy"] == res["accuracy"]


def test_cli_cross_validation_subset_of_folds(tmp_path):
    pos = write(tmp_path / "pos.txt", "\n".join(POS * 2) + "\n")
    neg = write(tmp_path / "neg.txt", "\n".join(NEG * 2) + "\n")
    out = tmp_path / "cv.json"
    assert main(["--data", str(pos), str(neg), "--folds", "4", "--max-folds", "2", "--json", str(out),
                 *SMALL, "--epochs", "2"]) == 0
    res = json.loads(out.read_text())
    assert (res["folds_run"], res["folds_total"], len(res["folds"])) == (2, 4, 2)
    assert res["mean"] == pytest.approx(sum(f["accuracy"] for f in res["folds"]) / 2)
    assert res["std"] >= 0 and res["labels"] == ["neg", "pos"] and len(res["best_epoch"]) == 2


def test_cli_fine_tunes_one_of_our_language_models(tmp_path, capsys):
    from spikegpt.checkpoint import save_model

    train, test = _separable(tmp_path)
    text = "".join(POS + NEG)
    lm = tiny_lm([Example(text, "", "")], vocab="char", n_layer=1, n_embd=32)
    save_model(tmp_path / "lm" / "ckpt-00000000.pt", lm)
    args = ["--train", str(train), "--test", str(test), "--init-from", str(tmp_path / "lm"), "--out-dir",
            str(tmp_path / "clf"), *SMALL[4:]]
    assert main(args) == 0
    clf, ckpt = load_classifier(tmp_path / "clf")
    assert clf.tokenizer == lm.tokenizer and ckpt["model_config"] == lm.config.to_dict()
    capsys.readouterr()
    assert main([*args, "--v-threshold", "0.5"]) == 2  # our checkpoint records its own threshold
    assert "--reference imports only" in capsys.readouterr().err


def test_bpe_vocabulary_is_trained_on_the_training_sentences_only(tmp_path, capsys):
    train = [Example(t, "1", "") for t in POS * 3] + [Example("caf\udce9 " + t, "0", "") for t in NEG * 3]
    lm = tiny_lm(train, vocab="bpe", bpe_vocab_size=300)
    tok = lm.tokenizer
    assert tok.kind == "bpe" and lm.config.vocab_size == tok.vocab_size <= 300
    assert len(tok.encode("good fun movie")) < len("good fun movie")  # merges learnt from the sentences
    assert tok.encode("caf\udce9") == tok.encode("caf\xe9")  # a Latin-1 byte reads as its character
    trainf, test = _separable(tmp_path)
    out = tmp_path / "res.json"
    assert main(["--train", str(trainf), "--test", str(test), "--vocab", "bpe", "--bpe-vocab-size", "280",
                 "--json", str(out), "--out-dir", str(tmp_path / "clf"), *SMALL]) == 0
    assert json.loads(out.read_text())["accuracy"] >= 0.75
    clf, _ = load_classifier(tmp_path / "clf")
    assert clf.tokenizer.kind == "bpe" and clf.tokenizer.vocab_size <= 280
    capsys.readouterr()
    assert main(["--train", str(trainf), "--test", str(test), "--bpe-vocab-size", "300", *SMALL]) == 2
    assert "add --vocab bpe" in capsys.readouterr().err
    assert main(["--train", str(trainf), "--test", str(test), "--vocab", "bpe", "--bpe-vocab-size", "100",
                 *SMALL]) == 2
    assert "at least 257" in capsys.readouterr().err


def test_cli_bad_data_is_one_line(tmp_path, capsys):
    train, test = _separable(tmp_path)
    bad = write(tmp_path / "dev.txt", "1 fine\n3 unseen label\n")
    assert main(["--train", str(train), "--dev", str(bad), "--test", str(test), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2: label '3'" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# The real sets (skipped without ../shared).
# --------------------------------------------------------------------------------------------------
def test_real_sets_read_as_documented():
    if not SHARED.is_dir():
        pytest.skip("../shared/data/classification is not present (a user's clone)")
    mr = read_examples(SHARED / "rt-polarity.all")
    assert len(mr) == 10662 and Counter(e.label for e in mr) == Counter({"0": 5331, "1": 5331})
    sizes = [len(read_examples(SHARED / f"stsa.fine.{s}")) for s in ("train", "dev", "test")]
    assert sizes == [8544, 1101, 2210]
