"""`python -m llm.train.plan`: the trainer's memory estimate for clusters and model sizes this machine cannot run."""

import pytest

from llm.config import ModelConfig, preset
from llm.train.distributed import memory_estimate
from llm.train.plan import count_params, main


def test_8b_fits_8_gpus_of_80_gib_with_fsdp_and_activation_checkpointing(capsys):
    assert main(["--preset", "8b", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "model: 8.03B parameters, 32 layers" in out
    assert "plan: FSDP2 over 8 data-parallel rank(s) x TP 1" in out and out.split("\n")[2].endswith(": fits")
    assert "  DDP x 8            1  off" in out and "  FSDP2 x 1          8  on" in out  # every layout listed


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
    assert fsdp4_tp2[1] == pytest.approx(one[1] / 2)  # sequence parallel: activations / tp
    assert fsdp4_tp2[0] == pytest.approx((16 * n / 4 + 2 * n) / 2)  # states / (dp x tp), bf16 copies / tp
