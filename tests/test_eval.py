"""Perplexity evaluation: windows cover every token once; loss equals a hand computation; ppl = exp(loss)."""

import math

import pytest
import torch
from conftest import tiny_model

from llm.eval.perplexity import EvalError, dataset_stream, evaluate, windows
from llm.model import Transformer
from llm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(vocab_size=50, block_size=16, n_head=2).eval()


@pytest.mark.parametrize("n,context,stride", [(2, 16, 16), (40, 16, 16), (40, 16, 5), (41, 8, 1), (17, 16, 16)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    seen = []
    for b, e, first in windows(n, context, stride):
        assert 0 < e - b <= context and 0 <= first < e - b
        targets = list(range(b + 1 + first, e + 1))
        seen += targets
        if b > 0:
            assert targets[0] - b >= context - stride  # context of the first scored target
    assert seen == list(range(1, n))


def test_bad_stride_is_one_clear_line():
    with pytest.raises(EvalError, match=r"^need 1 <= stride <= context, got stride 9 and context 8$"):
        windows(20, 8, 9)


@pytest.mark.parametrize("stride,batch", [(16, 1), (5, 3)])
def test_loss_equals_a_hand_computation_and_perplexity_is_its_exp(model, stride, batch):
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (45,)).tolist()
    res = evaluate(model, ids, context=16, stride=stride, batch_size=batch, n_bytes=30)
    # by hand: each target t with exactly the tokens its window gives it, one prefix at a time
    nll = []
    with torch.no_grad():
        for b, e, first in windows(len(ids), 16, stride):
            for t in range(b + 1 + first, e + 1):
                logits, _ = model(torch.tensor([ids[b:t]]))
                nll.append(-float(logits[0, -1].log_softmax(-1)[ids[t]]))
    assert res.tokens == len(nll) == 44
    assert res.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(res.loss), rel=1e-12)
    assert res.bits_per_byte == pytest.approx(sum(nll) / math.log(2) / 30, rel=1e-5)


def test_one_window_is_the_models_own_loss(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (17,))
    res = evaluate(model, ids.tolist())
    with torch.no_grad():
        _, loss = model(ids[None, :-1], ids[None, 1:])
    assert res.windows == 1 and res.loss == pytest.approx(float(loss), rel=1e-5)


def test_too_little_data_and_too_long_context_are_refused(model):
    with pytest.raises(EvalError, match=r"the dataset has 1 token\(s\); at least 2"):
        evaluate(model, [3])
    with pytest.raises(EvalError, match="context 32 exceeds the model's context length 16"):
        evaluate(model, [3, 4, 5], context=32)


def test_dataset_stream_puts_end_of_text_before_each_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("héllo 日本")
    (tmp_path / "empty.txt").write_text("  \n")
    tok = Tokenizer.train(["hello world héllo 日本"], 260)
    ids, n_bytes = dataset_stream(str(tmp_path), tok, split="all")
    assert ids == [tok.eot_id] + tok.encode("hello world") + [tok.eot_id] + tok.encode("héllo 日本")
    assert n_bytes == len(b"hello world") + len("héllo 日本".encode())
    cut, cut_bytes = dataset_stream(str(tmp_path), tok, max_tokens=5, split="all")
    assert cut == ids[:5] and cut_bytes == len(tok.decode_bytes(ids[1:5]))


@pytest.mark.parametrize("docs", [30, 1], ids=["folder", "one-file"])
def test_eval_scores_the_documents_the_trainer_holds_out(tmp_path, docs):
    """The val split of `llm eval --dataset` is the prepared val shards the trainer validates on (the same
    documents, or a one-document corpus's same last tokens); train is the rest."""
    import numpy as np

    from llm.config import DataConfig
    from llm.data.shards import load_manifest, prepare, shard_list

    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(docs):
        (src / f"d{i:02d}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(9)))
    tok = Tokenizer.train([(src / "d00.txt").read_text()], 280)
    dataset = str(src if docs > 1 else src / "d00.txt")
    out = prepare(DataConfig(dataset=dataset, data_dir=str(tmp_path / "data"), val_fraction=0.2), lambda s: None,
                  tokenizer=tok)
    m = load_manifest(out)
    for split in ("val", "train"):
        shards = np.concatenate([np.fromfile(out / s["file"], dtype=m["dtype"]) for s in shard_list(m, split)])
        ids, _ = dataset_stream(dataset, tok, split=split, val_fraction=0.2)
        # eot before each document, not after; a one-document corpus's train part ends mid-text (no eot after it)
        expect = shards if docs == 1 and split == "train" else shards[:-1]
        assert ids[0] == tok.eot_id and ids[1:] == expect.tolist(), split
    assert len(dataset_stream(dataset, tok, split="all")[0]) > len(dataset_stream(dataset, tok, val_fraction=0.2)[0])
