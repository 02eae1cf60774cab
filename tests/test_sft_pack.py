"""--sft-pack: several fine-tuning examples per row, kept apart by document-masked attention, answer-only labels
kept; every example's loss equals its loss run alone (unpacked) within 1e-5."""

import json

import pytest
import torch
from conftest import tiny_model

from llm import chat
from llm.config import DataConfig
from llm.data import sft
from llm.tokenizer import Tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    tok = chat.chat_tokenizer(Tokenizer.train(["def f(x):\n    return x + 1\n" * 50, "A pear. Hello there"], 300))[0]
    rows = [{"instruction": f"Add {i}." + " Be quick." * (i % 4), "input": f"x = {i}",
             "output": f"x + {i}" * (1 + i % 3)} for i in range(40)]
    (d / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = sft.prepare(DataConfig(dataset=str(d / "ex.jsonl"), data_dir=str(d / "data"), val_fraction=0.0), tok, 128,
                       log=lambda *a: None)
    return tok, path


def _example_losses(logits: torch.Tensor, y: torch.Tensor, seg: torch.Tensor) -> list[tuple[int, float]]:
    """[(n scored tokens, mean NLL)] of every segment with scored tokens, row by row."""
    out = []
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), ignore_index=IGNORE,
                                            reduction="none").view(y.shape)
    for r in range(y.shape[0]):
        for s in seg[r].unique_consecutive():
            keep = (seg[r] == s) & (y[r] != IGNORE)
            if keep.any():
                out.append((int(keep.sum()), float(nll[r][keep].mean())))
    return out


def test_packed_rows_hold_whole_examples_with_their_answer_masks(prepared):
    _, path = prepared
    packed = sft.SFTLoader(path, "train", 4, 128, seed=1, pack=True).batch(3)
    x, y, seg = packed[0], packed[1], packed.segments
    assert x.shape == y.shape == seg.shape == (4, 128)
    per_row = [int(((seg[r][:, None] == seg[r].unique()) & (y[r] != IGNORE)[:, None]).any(0).sum()) for r in range(4)]
    assert min(per_row) >= 2  # every row packs at least two scored examples
    scored = int((y != IGNORE).sum())
    plain = sft.SFTLoader(path, "train", 4, 128, seed=1)
    assert scored > 1.3 * int((plain.batch(3)[1] != IGNORE).sum())  # more answer tokens per batch than padded rows


def test_each_packed_example_has_the_loss_it_has_alone(prepared):
    tok, path = prepared
    loader = sft.SFTLoader(path, "train", 3, 128, seed=0, pack=True)
    b = loader.batch(0)
    x, y, seg = b[0], b[1], b.segments
    model = tiny_model(vocab_size=tok.n_vocab, block_size=128)
    packed = _example_losses(model(x, segments=seg)[0], y, seg)
    alone = []
    for r in range(x.shape[0]):  # every example cut out of its row and run as its own sequence
        for s in seg[r].unique_consecutive():
            cols = (seg[r] == s).nonzero().flatten()
            xs, ys = x[r:r + 1, cols], y[r:r + 1, cols]
            if (ys != IGNORE).any():
                alone += _example_losses(model(xs)[0], ys, torch.zeros_like(ys))
    assert len(packed) == len(alone) >= 6
    for (n, a), (m, c) in zip(packed, alone):
        assert n == m and a == pytest.approx(c, abs=1e-5)
    _, loss = model(x, y, segments=seg)  # the trained loss: the token mean over every answer token of the batch
    total = sum(n * v for n, v in packed) / sum(n for n, _ in packed)
    assert loss.item() == pytest.approx(total, abs=1e-5)
