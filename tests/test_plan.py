"""`python -m llm.train.plan`: the trainer's memory estimate for clusters and model sizes this machine cannot run."""

import pytest
import torch

from llm.config import ModelConfig, preset
from llm.model import Transformer
from llm.train.distributed import memory_estimate
from llm.train.plan import count_params, main


def test_8b_fits_8_gpus_of_80_gib_with_fsdp_and_activation_checkpointing(capsys):
    assert main(["--preset", "8b", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "model: 8.03B parameters, 32 layers" in out
    assert "plan: FSDP2 over 8 data-parallel rank(s) x TP 1" in out and out.split("\n")[2].endswith(": fits")
    assert "  DDP x 8            1  off" in out and "  FSDP2 x 1          8  on" in out  # every layout listed


def test_plan_refuses_what_the_trainer_refuses(capsys):
    assert main(["--preset", "8b", "--tp", "2", "--no-fsdp"]) == 2
    assert "needs FSDP2 (the trainer refuses DDP x TP)" in capsys.readouterr().err
    assert main(["--preset", "8b", "--gpus", "4", "--gpu-mem", "1000"]) == 0
    out = capsys.readouterr().out
    assert "  DDP x 2            2" not in out and "  FSDP2 x 2          2  off" in out  # no DDP x TP rows
    assert "  DDP x 1            4  off" in out and "  DDP x 4            1  off" in out  # pure TP, pure DDP


def test_a_layout_that_does_not_fit_exits_1(capsys):
    assert main(["--preset", "70b", "--gpus", "8", "--gpu-mem", "80", "--no-fsdp"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [(["--tp", "3"], "--tp 3 must divide the 8 GPUs of a node"),
                                       (["--tp", "16", "--gpus", "16"], "--tp 16 must divide n_kv_head 8"),
                                       (["--preset", "huge"], "unknown preset 'huge'")])
def test_bad_input_is_one_error_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1


def test_tensor_and_fully_sharded_data_parallelism_divide_the_estimate():
    cfg = ModelConfig(**preset("8b"))
    n = count_params(cfg)
    one = memory_estimate(cfg, n, 1, True, True, True, True)
    fsdp4_tp2 = memory_estimate(cfg, n, 1, True, True, True, True, world=4, fsdp=True, tp=2)
    # TP as built (llm/train/tp.py): attention / MLP matrices and the (untied) embedding split, head, norms replicated
    assert not cfg.tie_embeddings
    with torch.device("meta"):
        names = Transformer(cfg).named_parameters()
        rep = sum(p.numel() for k, p in names if not any(m in k for m in ("attn.wqkv", "attn.wo", "mlp.w", "tok_emb")))
    assert fsdp4_tp2[0] == pytest.approx((16 / 4 + 2) * (rep + (n - rep) / 2), rel=1e-6)  # states / dp, bf16 copies
    assert one[1] / 2 < fsdp4_tp2[1] < one[1]  # no sequence parallelism: the residual stream is replicated
    sp = memory_estimate(cfg, n, 1, True, True, True, True, world=4, fsdp=True, tp=2, sp=True)
    assert sp == (fsdp4_tp2[0], pytest.approx(one[1] / 2))  # sequence parallel: every activation / tp
    # the cross-entropy objective (llm plan's case): the head split by vocabulary rows too, only the norms replicated
    split = memory_estimate(cfg, n, 1, True, True, True, True, world=4, fsdp=True, tp=2, split_head=True)
    with torch.device("meta"):
        norms = sum(p.numel() for k, p in Transformer(cfg).named_parameters() if p.dim() == 1)
    assert split == (pytest.approx((16 / 4 + 2) * (norms + (n - norms) / 2), rel=1e-6), fsdp4_tp2[1])
    assert split[0] < fsdp4_tp2[0] - (16 / 4 + 2) * cfg.padded_vocab_size * cfg.n_embd / 2 * 0.99  # half the head
    assert main(["--preset", "8b", "--tp", "2", "--sequence-parallel"]) == 0
