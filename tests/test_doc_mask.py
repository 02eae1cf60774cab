"""--doc-mask in the model and the trainer: a packed row's documents see only themselves (each document's
logits equal running it alone), RoPE/learned positions restart per document on request, and a training run
with the flag derives the documents from the end-of-text token."""

import json
import math

import pytest
import torch
from conftest import metrics_records, tiny_model, train_argv

from llm import checkpoint as ck
from llm.model import doc_positions, doc_segments
from llm.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
EOT = 0


def _packed(lengths: list[int], vocab: int = 101) -> torch.Tensor:
    """One row of documents of the given lengths, each closed by EOT (ids 1.. elsewhere)."""
    docs = [torch.cat([torch.randint(1, vocab, (n - 1,)), torch.tensor([EOT])]) for n in lengths]
    return torch.cat(docs)[None]


def test_segments_and_positions_follow_the_end_of_text_token():
    idx = torch.tensor([[5, EOT, EOT, 7, 8, EOT, 9], [EOT, 1, 2, 3, 4, 5, 6]])
    assert doc_segments(idx, EOT).tolist() == [[0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert doc_positions(doc_segments(idx, EOT)).tolist() == [[0, 1, 0, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="eot_id"):
        doc_segments(idx, None)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_each_packed_document_gives_the_logits_it_has_alone(pos_emb):
    model = tiny_model(pos_emb=pos_emb).eval()
    lengths = [9, 1, 30, 1, 16]
    idx = _packed(lengths)
    alone = [model(idx[:, s:s + n])[0] for s, n in zip([sum(lengths[:i]) for i in range(5)], lengths)]
    model.cfg.doc_mask, model.cfg.eot_id, model.cfg.doc_positions = True, EOT, "restart"
    packed = model(idx)[0]
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    model.cfg.doc_positions = "continue"
    cont = model(idx)[0]
    if pos_emb == "rope":  # RoPE scores depend on relative positions only: within a document both agree
        torch.testing.assert_close(cont, packed, atol=1e-5, rtol=1e-5)
    else:  # learned absolute positions: only the first document agrees
        assert torch.allclose(cont[:, :9], packed[:, :9], atol=1e-5) and not torch.allclose(cont, packed, atol=1e-3)
    model.cfg.doc_mask = False
    assert not torch.allclose(model(idx)[0], packed, atol=1e-3)  # without the mask, documents leak into each other


def test_training_with_doc_mask_derives_documents_from_the_end_of_text_token(tmp_path):
    tmp = tmp_path
    docs = [{"text": f"def f{i}(x):\n    return x * {i % 7} + {i}\n"} for i in range(400)]  # ~15-token documents
    (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    argv = dict(dataset=tmp / "docs.jsonl", max_steps=3)
    assert main(train_argv(tmp, "plain", **argv)) == 0
    assert main(train_argv(tmp, "doc", doc_positions="restart", **argv) + ["--doc-mask"]) == 0
    losses = {o: [r["loss"] for r in metrics_records(tmp / o) if "loss" in r] for o in ("plain", "doc")}
    assert len(losses["doc"]) == 3 and all(math.isfinite(v) for v in losses["doc"])
    assert losses["doc"] != losses["plain"]  # the mask changed what the model sees
    cfg = json.loads((ck.resolve(tmp / "doc") / "config.json").read_text())
    model = cfg.get("model", cfg)
    assert model["doc_mask"] is True and model["doc_positions"] == "restart" and model["eot_id"] is not None
