"""Checkpoint round trip, strict loading, corrupted files, atomic pointer."""

import json

import pytest
import torch
from conftest import tiny_model

from llm import checkpoint as ck
from llm.checkpoint import CheckpointError
from llm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello world, hello there " * 50], 300)


def make(**kw):
    return tiny_model(**(dict(vocab_size=300, block_size=32, n_head=2) | kw)).eval()


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True, pos_emb="learned", norm="layernorm", mlp="gelu",
                                         bias=True)], ids=["llama", "gpt2"])
def test_round_trip_gives_identical_logits(tmp_path, tok, kw):
    model = make(**kw)
    path = ck.save(tmp_path, "ckpt-1", model, tok)
    loaded, tok2, cfg = ck.load_checkpoint(tmp_path)
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert tok2.encode("hello there") == tok.encode("hello there")
    assert (tmp_path / "latest").read_text().strip() == path.name == "ckpt-1"


def test_latest_pointer_moves_only_after_a_complete_save(tmp_path, tok):
    model = make()
    ck.save(tmp_path, "ckpt-1", model, tok)
    ck.save(tmp_path, "ckpt-2", model, tok)
    assert ck.resolve(tmp_path).name == "ckpt-2"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope")


def test_architecture_mismatch_lists_tensors(tmp_path, tok):
    ck.save(tmp_path, "c", make(), tok)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["model"]["n_layer"] = 3
    cfg["model"]["n_embd"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.2\..*wrong shape: "):
        ck.load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("damage", ["cut1", "half", "header_only", "bad_json", "flip"])
def test_corrupted_weights_give_one_clear_line(tmp_path, tok, damage):
    ck.save(tmp_path, "c", make(), tok)
    f = tmp_path / "c" / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "cut1":
        data = data[:-1]
    elif damage == "half":
        data = data[: len(data) // 2]
    elif damage == "header_only":
        data = data[: 8 + n]
    elif damage == "bad_json":
        data[8:12] = b"}}}}"
    else:
        data[8 + n + 100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(tmp_path / "c")
    msg = str(e.value)
    assert "model.safetensors" in msg and "\n" not in msg
    if damage == "flip":
        assert "checksum mismatch" in msg


def test_pickle_file_is_refused_and_never_run(tmp_path, tok):
    import pickle

    ck.save(tmp_path, "c", make(), tok)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "c" / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ck.load_checkpoint(tmp_path / "c")
    assert not marker.exists()


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True)], ids=["untied", "tied"])
def test_soup_writes_the_mean_of_the_weights(tmp_path, tok, kw, capsys):
    """`llm checkpoint soup OUT A B C`: every float tensor is the mean of the three (tied weights stay tied), the
    config and tokenizer are the first's; a soup of one checkpoint is that checkpoint bitwise; another architecture,
    or a non-empty OUT, is one error line."""
    models = []
    for i in range(3):
        models.append(make(**kw))
        torch.manual_seed(i)
        with torch.no_grad():  # three different models (tiny_model seeds its own init)
            for p in models[-1].parameters():
                p.add_(0.1 * torch.randn_like(p))
        ck.save(tmp_path / f"m{i}", "ckpt-1", models[-1], tok)
    assert ck.main(["soup", str(tmp_path / "soup"), *(str(tmp_path / f"m{i}") for i in range(3))]) == 0
    assert "wrote" in capsys.readouterr().out
    soup, tok2, cfg = ck.load_checkpoint(tmp_path / "soup")
    states = [m.state_dict() for m in models]
    for k, v in soup.state_dict().items():
        want = (states[0][k].double() + states[1][k].double() + states[2][k].double()) / 3
        assert torch.allclose(v.double(), want, rtol=0, atol=1e-7), k
        assert not torch.equal(v, states[0][k]), k
    if kw:
        assert soup.lm_head.weight is soup.tok_emb.weight
    assert len(cfg["soup_of"]) == 3 and tok2.encode("hello there") == tok.encode("hello there")
    one = ck.soup([tmp_path / "m1"], tmp_path / "one")
    loaded = ck.load_checkpoint(one)[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in states[1].items())
    ck.save(tmp_path / "other", "ckpt-1", make(block_size=64), tok)
    for argv, msg in ((["soup", str(tmp_path / "x"), str(tmp_path / "m0"), str(tmp_path / "other")], "differ in model"),
                      (["soup", str(tmp_path / "soup"), str(tmp_path / "m0")], "is not an empty directory")):
        assert ck.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err
