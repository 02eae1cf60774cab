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
    ids, n_bytes = dataset_stream(str(tmp_path), tok)
    assert ids == [tok.eot_id] + tok.encode("hello world") + [tok.eot_id] + tok.encode("héllo 日本")
    assert n_bytes == len(b"hello world") + len("héllo 日本".encode())
    cut, cut_bytes = dataset_stream(str(tmp_path), tok, max_tokens=5)
    assert cut == ids[:5] and cut_bytes == len(tok.decode_bytes(ids[1:5]))
