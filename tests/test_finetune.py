"""Fine-tuning data, chat templates and the fine-tuning runs (llm/data/sft.py, llm/chat.py, llm/train/finetune.py).

RELIABILITY.md promises 19 (bad fine-tuning data: one line naming the file and line) and 21 (LoRA runs
resume exactly).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import plant_losses, run_two_ranks, step_losses, tiny_model, train_argv, write_code_corpus

from llm import chat
from llm import checkpoint as ck
from llm.config import DataConfig
from llm.data import sft
from llm.data.corpus import DataError
from llm.loading import load_model
from llm.tokenizer import Tokenizer
from llm.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# Real-world templates: Meta-Llama-3-8B-Instruct's, Qwen2-Instruct's (ChatML with a default system turn), and
# Mistral-Instruct-v0.1's (raise_exception on roles out of order).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
          "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         "assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role']"
           " == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there "},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
EXAMPLES = [{"instruction": "Add one.", "input": "x = 1", "output": "x + 1"},
            {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}]},
            {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hey."}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Bye now."}]}]


@pytest.fixture(scope="module")
def tok():
    return chat.chat_tokenizer(Tokenizer.train(["def f(x):\n    return x + 1\n" * 50, "A pear. Hello there"], 300))[0]


@pytest.mark.parametrize("template", [LLAMA3, QWEN2], ids=["llama3", "chatml-qwen2"])
@pytest.mark.parametrize("gen", [False, True], ids=["closed", "generation-prompt"])
def test_chat_rendering_equals_transformers(template, gen):
    tu = pytest.importorskip("transformers.utils.chat_template_utils")
    msgs = CONV if gen else CONV + [{"role": "assistant", "content": "4"}]
    kw = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    theirs, _ = tu.render_jinja_template(conversations=[msgs], chat_template=template, add_generation_prompt=gen, **kw)
    assert chat.render(template, msgs, add_generation_prompt=gen, **kw) == theirs[0]


def test_template_errors_are_one_line():
    with pytest.raises(chat.ChatError, match="roles must alternate"):
        chat.render(MISTRAL, [{"role": "assistant", "content": "x"}], bos_token="<s>", eos_token="</s>")


def test_answer_mask_covers_answers_and_end_of_turn(tok):
    ids, scored = chat.encode_chat(tok, sft.to_messages(EXAMPLES[2], "x"))
    answers = tok.decode([i for i, s in zip(ids, scored) if s])
    assert answers == "Hey.<|im_end|>\nBye now.<|im_end|>\n"
    assert tok.eot_id == tok.special_tokens()[chat.IM_END] and ids.count(tok.eot_id) == 5
    assert all(chat.encode_chat(tok, sft.to_messages(EXAMPLES[2], "x"), score_all=True)[1])


def test_masked_loss_equals_hand_computed(tmp_path, tok):
    """Three examples in one batch: the model's loss is the mean NLL over exactly the answer tokens."""
    f = tmp_path / "ex.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES + EXAMPLES[:1]))  # the last one is held out
    cfg = DataConfig(dataset=str(f), data_dir=str(tmp_path / "data"), val_fraction=0.0)
    path = sft.prepare(cfg, tok, 128, log=lambda *a: None)
    loader = sft.SFTLoader(path, "train", 3, 128, seed=0)
    x, y = loader.batch(0)
    model = tiny_model(vocab_size=tok.n_vocab, block_size=128)
    _, loss = model(x, y)
    logits, _ = model(x)
    nll, n = 0.0, 0
    for r, i in enumerate(loader.picks(0)):
        a, b = int(loader.offsets[i]), int(loader.offsets[i + 1])
        ids, mask = loader.ids[a:b].astype(int), loader.mask[a:b]
        for t in range(b - a - 1):
            if mask[t + 1]:
                nll -= torch.log_softmax(logits[r, t].double(), -1)[ids[t + 1]].item()
                n += 1
    assert n == int((y != -100).sum())
    assert loss.item() == pytest.approx(nll / n, abs=1e-5)


@pytest.mark.parametrize("line, msg", [
    ({"instruction": "Do it."}, "field 'output' is missing"),
    ({"prompt": "x", "completion": "y"}, 'expected an object with "messages"'),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order: message 0 is 'assistant'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty answer"),
    ({"messages": [{"role": "user", "content": 3}]}, 'string "role" and "content"'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "has role 'bot'"),
], ids=["missing-field", "no-known-fields", "roles-order", "empty-answer", "wrong-type", "unknown-role"])
def test_bad_jsonl_names_file_and_line(tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{msg}"):
        list(sft.read_jsonl(f))


def test_embedded_set_is_deterministic_with_a_held_out_split():
    cfg = DataConfig(dataset=sft.EMBEDDED)
    rows = list(sft.examples(cfg))
    assert rows == list(sft.examples(cfg)) and len(rows) > 500
    names = {n: m for _, n, m in rows}
    assert names["shutil.copyfile"] == [
        {"role": "user", "content": "What does shutil.copyfile do?"},
        {"role": "assistant", "content": "Copy data from src to dst in the most efficient way possible."}]
    assert 0 < sum(s == "val" for s, _, _ in rows) < len(rows) / 5


# ----------------------------------------------------------------------------- runs through train.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained base (6 steps), and fine-tuning data for it."""
    tmp = tmp_path_factory.mktemp("ft")
    write_code_corpus(tmp)
    assert main(train_argv(tmp, "base")) == 0
    (tmp / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"Double {i}.", "output": f"{2 * i}"}) + "\n"
                                           for i in range(40)))
    return tmp


def ft_argv(tmp: Path, out: str, **kw) -> list[str]:
    base = dict(init_from=tmp / "base", dataset=tmp / "sft.jsonl", val_fraction=0.1, max_steps=6, dropout=0.1,
                lora_rank=4, lora_targets="q,k,v,o,gate,up,down", lora_dropout=0.1)
    return [a for a in train_argv(tmp, out, **(base | kw)) if a != "--vocab-size" and a != "300"]


def test_lora_run_saves_adapters_and_resumes_exactly(runs):
    """Promise 21: a LoRA run of 6 steps == 3 steps + resume + 3 steps (adapter tensors and losses, bitwise)."""
    assert main(ft_argv(runs, "lora")) == 0
    assert main(ft_argv(runs, "lora2", max_steps=3)) == 0
    assert main(ft_argv(runs, "lora2", max_steps=6) + ["--resume"]) == 0
    a, b = ck.resolve(runs / "lora"), ck.resolve(runs / "lora2")
    assert not (a / ck.MODEL_FILE).exists() and (a / "adapter.safetensors").stat().st_size < 200_000
    ta, tb = ck.read_tensors(a / "adapter.safetensors")[0], ck.read_tensors(b / "adapter.safetensors")[0]
    assert ta.keys() == tb.keys() and "tok_emb.new_rows" in ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    opt = ck.read_optimizer_state(a)
    assert sum(v.numel() for s in opt["state"].values() for k, v in s.items() if k == "exp_avg") == \
        sum(v.numel() for v in ta.values())  # only adapter parameters in the optimizer
    losses = [[json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
              for d in (runs / "lora", runs / "lora2")]
    assert losses[0] == losses[1]
    model, tok, _ = load_model(runs / "lora")  # a LoRA checkpoint loads its base
    assert tok.decode([tok.eot_id]) == chat.IM_END and model.cfg.vocab_size == tok.n_vocab


PREFIX = dict(peft="prefix", prefix_tokens=2, prefix_hidden=16, lora_rank="none")
ADAPTER = dict(peft="adapter", adapter_dim=4, lora_rank="none")


@pytest.mark.parametrize("method", [PREFIX, ADAPTER], ids=["prefix", "adapter"])
def test_prefix_and_adapter_runs_save_only_their_tensors_and_resume_exactly(runs, method):
    """Promise 21 for prefix tuning and bottleneck adapters: 6 steps == 3 + resume + 3 (tensors and losses, bitwise);
    the checkpoint holds only the trained tensors (a prefix also folded) and names its method and base."""
    from llm import peft

    name = method["peft"]
    assert main(ft_argv(runs, name, **method)) == 0
    assert main(ft_argv(runs, name + "2", **method, max_steps=3)) == 0
    assert main(ft_argv(runs, name + "2", **method) + ["--resume"]) == 0
    a, b = ck.resolve(runs / name), ck.resolve(runs / (name + "2"))
    assert not (a / ck.MODEL_FILE).exists()
    ta, tb = ck.read_tensors(a / "adapter.safetensors")[0], ck.read_tensors(b / "adapter.safetensors")[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "tok_emb.new_rows" in ta and all(k.startswith("prefix.") or ".adapter." in k or k.endswith("new_rows")
                                            for k in ta)
    assert step_losses(runs / name) == step_losses(runs / (name + "2"))
    conf = peft.read_config(a)
    assert conf["method"] == name and conf["base"] == str((runs / "base").resolve())
    opt = ck.read_optimizer_state(a)
    n_opt = sum(v.numel() for s in opt["state"].values() for k, v in s.items() if k == "exp_avg")
    model, tok, _ = load_model(runs / name)  # the checkpoint alone loads its base, the prefix folded
    if name == "prefix":
        assert {"prefix.keys", "prefix.values", "prefix.reparam.init"} <= ta.keys()
        assert n_opt == sum(v.numel() for k, v in ta.items() if k.startswith(("prefix.reparam.", "tok_emb", "lm_head"))
                            and not k.endswith("init"))
        assert model.prefix.keys.shape == (1, 2, 2, 16) and not hasattr(model.prefix, "reparam")
    else:
        assert n_opt == sum(v.numel() for v in ta.values())
    assert tok.decode([tok.eot_id]) == chat.IM_END


@pytest.mark.parametrize("method", [{}, PREFIX], ids=["lora", "prefix"])
def test_loss_spike_rollback_of_a_lora_run_restores_the_adapter(runs, monkeypatch, method):
    """Two bad steps in a row (spike_rollback 2) in a LoRA run: the rollback reads the checkpoint's adapter (a LoRA
    checkpoint has no model.safetensors) and the live adapter equals it afterwards; the run finishes."""
    from llm import lora, peft
    from llm.train import resume, trainer

    plant_losses(monkeypatch, {6: float("nan"), 7: 10.0})  # training forwards 6 and 7: a NaN loss, then a spike
    seen = []

    def rollback(src, model, *a):
        step = real_rollback(src, model, *a)
        saved = ck.read_tensors(src / lora.ADAPTER_FILE)[0]
        live = peft.trained_tensors(model)
        seen.append(len(live) > 2 and all(torch.equal(p.detach(), saved[k]) for k, p in live.items()))
        return step

    real_rollback = resume.rollback
    monkeypatch.setattr(trainer, "rollback", rollback)
    out = f"{method.get('peft', 'lora')}-rollback"
    args = ft_argv(runs, out, max_steps=8, save_interval=4, spike_window=3, spike_zscore=6,
                   spike_rollback=2, health_interval=0, lora_dropout=0.0, dropout=0.0, **method)
    assert main(args) == 0
    events = [json.loads(ln) for ln in (runs / out / "metrics.jsonl").read_text().splitlines()
              if '"event"' in ln]
    assert [(e["step"], e["event"]) for e in events] == [(6, "skip"), (7, "skip"), (4, "rollback")]
    assert seen == [True]
    assert ck.resolve(runs / out).name == "ckpt-0000008"


def test_full_finetune_grows_the_vocab_in_the_checkpoint(runs):
    assert main(ft_argv(runs, "full", lora_rank="none", max_steps=2)) == 0
    model, tok, _ = load_model(runs / "full")
    assert tok.special_tokens()[chat.IM_END] == tok.eot_id < model.cfg.padded_vocab_size


def test_chat_commands_without_max_new_tokens_answer_on_their_own_line(runs, capsys, monkeypatch):
    """The README's chat commands give no --max-new-tokens: on a context (32) shorter than the default 200 they
    answer with the room the context leaves; the answer starts on the line after the question."""
    import io

    from llm.generate.cli import main as sample_main

    assert main(ft_argv(runs, "lora-chat", max_steps=2)) == 0
    capsys.readouterr()
    q = "Double 3."
    assert sample_main(["--checkpoint", str(runs / "base"), "--lora", str(runs / "lora-chat"), "--chat",
                        "--prompt", q, "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(q + "\n") and "max-new-tokens" in err and "the room the context (32) leaves" in err, err
    assert sample_main(["--checkpoint", str(runs / "lora-chat"), "--chat", "--prompt", q, "--stream"]) == 0
    assert capsys.readouterr().out.startswith(q + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("Double 2.\nDouble 4.\n\n"))  # interactive, two turns
    assert sample_main(["--checkpoint", str(runs / "lora-chat"), "--chat", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "answers up to 200 tokens or the room the context (32) leaves" in err
    assert "note: the oldest exchange left the conversation to fit the context" in err  # turn 1 filled it


@pytest.mark.parametrize("flags, msg", [
    (dict(lora_targets="q,qq"), "--lora-targets: qq is not a LoRA target"),
    (dict(lora_rank=0), "--lora-rank must be >= 1, got 0"),
    (dict(init_from=""), "fine-tuning .* starts from a model: give --init-from"),
    (dict(ADAPTER, adapter_dim=0), "--adapter-dim must be >= 1 \\(the bottleneck width\\), got 0"),
    (dict(PREFIX, prefix_tokens=32), "--prefix-tokens 32: the prefix takes that many of the base's 32 positions"),
    (dict(PREFIX, lora_rank=4), "--lora-rank applies to --peft lora, not prefix"),
], ids=["bad-target", "rank-0", "no-init", "adapter-dim-0", "prefix-too-long", "lora-rank-with-prefix"])
def test_bad_lora_flags_are_one_line(runs, capsys, flags, msg):
    assert main(ft_argv(runs, "bad", **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(msg, err), err


def test_compiled_lora_run_equals_eager(runs):
    """--compile with LoRA: the same losses as eager (fp32, fused kernels round differently), one graph for every
    step (the SFT rows are padded to the block size when compiling; any recompile is an error here).

    torch's own config patcher, not pytest's monkeypatch: the dynamo config module serves its values through
    __getattr__, so pytest 9 records "no attribute" and undoes the patch with delattr, which hides the option
    from every later compile in the process (they then fail reading it)."""
    assert main(ft_argv(runs, "lora-eager", max_steps=3, lora_dropout=0.0, dropout=0.0)) == 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert main(ft_argv(runs, "lora-compiled", max_steps=3, lora_dropout=0.0, dropout=0.0) + ["--compile"]) == 0
    eager, compiled = step_losses(runs / "lora-eager"), step_losses(runs / "lora-compiled")
    assert sorted(compiled) == [1, 2, 3]
    assert all(abs(compiled[s] - eager[s]) <= 1e-5 * abs(eager[s]) for s in eager), (compiled, eager)
    assert eager[1] != eager[3]




@pytest.mark.slow
def test_lora_under_fsdp_matches_one_process_through_a_resume(runs):
    """2 gloo ranks x FSDP2 (frozen base and adapters sharded), stopped at step 3 and resumed to 6, against one
    process with the same global batch: the same losses, and the saved adapter is the full one."""
    kw = dict(max_steps=6, lora_dropout=0.0, dropout=0.0)
    assert main(ft_argv(runs, "lora-one", grad_accum=2, **kw)) == 0
    fsdp = [str(a) for a in ft_argv(runs, "lora-fsdp", grad_accum=1, **kw)] + ["--fsdp"]
    r = run_two_ranks(runs, [(fsdp, 3), (fsdp + ["--resume"], -1)])
    assert "FSDP2" in r.stdout and "resumed from" in r.stdout
    one, two = step_losses(runs / "lora-one"), step_losses(runs / "lora-fsdp")
    assert sorted(two) == list(range(1, 7))
    assert all(abs(two[s] - one[s]) <= 1e-5 * abs(one[s]) for s in one), (two, one)
    a = ck.read_tensors(ck.resolve(runs / "lora-one") / "adapter.safetensors")[0]
    b = ck.read_tensors(ck.resolve(runs / "lora-fsdp") / "adapter.safetensors")[0]
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # full, unsharded tensors
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.slow
def test_prefix_under_fsdp_and_adapters_under_ddp_match_one_process(runs):
    """One 2-rank launch: a prefix run under FSDP2 (its reparameterization sharded at the root), stopped at step 3
    and resumed, and an adapter run under DDP, against one process each with the same global batch: the same
    losses and adapter tensors (the prefix folded from the gathered full state)."""
    kw = dict(max_steps=6, dropout=0.0)
    jobs, outs = [], {}
    for name, method, extra in (("prefix", PREFIX, ["--fsdp"]), ("adapter", ADAPTER, [])):
        assert main(ft_argv(runs, f"{name}-one", grad_accum=2, **kw, **method)) == 0
        argv = [str(a) for a in ft_argv(runs, f"{name}-two", grad_accum=1, **kw, **method)] + extra
        jobs += [(argv, 3), (argv + ["--resume"], -1)]
        outs[name] = (runs / f"{name}-one", runs / f"{name}-two")
    r = run_two_ranks(runs, jobs)
    assert "FSDP2" in r.stdout and "DDP" in r.stdout and r.stdout.count("resumed from") == 2
    for one, two in outs.values():
        l1, l2 = step_losses(one), step_losses(two)
        assert sorted(l2) == list(range(1, 7))
        assert all(abs(l2[s] - l1[s]) <= 1e-5 * abs(l1[s]) for s in l1), (l2, l1)
        a = ck.read_tensors(ck.resolve(one) / "adapter.safetensors")[0]
        b = ck.read_tensors(ck.resolve(two) / "adapter.safetensors")[0]
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_qlora_run_on_an_int8_base_resumes_exactly(runs, capsys):
    """--init-from an int8 checkpoint with --lora-rank: the base stays int8 codes (QuantLoRALinear), the printed
    memory line compares its bytes to fp32, the run resumes exactly, and its checkpoint loads onto that base."""
    from llm import lora
    from llm.quant import QuantLinear
    from llm.quantize.__main__ import main as quantize_main

    assert quantize_main(["--checkpoint", str(runs / "base"), "--mode", "int8", "--out", str(runs / "base-int8")]) == 0
    kw = dict(init_from=runs / "base-int8", max_steps=4)
    capsys.readouterr()
    assert main(ft_argv(runs, "qlora", **kw)) == 0
    assert re.search(r"frozen base [\d.]+ MiB \(int8 block weights\) vs [\d.]+ MiB in fp32", capsys.readouterr().out)
    assert main(ft_argv(runs, "qlora2", **(kw | dict(max_steps=2)))) == 0
    assert main(ft_argv(runs, "qlora2", **kw) + ["--resume"]) == 0
    assert step_losses(runs / "qlora") == step_losses(runs / "qlora2")
    model, _, cfg = load_model(runs / "qlora")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert cfg["quantization"]["mode"] == "int8" and all(m.qweight.dtype == torch.int8 for m in layers)
    assert sum(isinstance(m, lora.QuantLoRALinear) for m in layers) == 5 * model.cfg.n_layer  # wqkv, wo, w1, w2, w3


def test_init_from_takes_the_base_shape_and_applies_only_run_time_model_flags():
    """--init-from: a model flag that would change the base is named in one note line (it used to be dropped
    silently);
    --doc-mask / --doc-positions apply to the base (attention only) with the tokenizer's end-of-text id; a prefix
    cannot be trained under --doc-mask (its rows are a cache the mask does not cover)."""
    from llm.config import ConfigError, ModelConfig, TrainConfig
    from llm.train.finetune import base_config
    base = ModelConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=4, vocab_size=300)
    tcfg = TrainConfig(init_from="base-dir")
    said: list[str] = []
    assert base_config(base, ModelConfig(n_layer=8, n_head=2), {"n_layer", "n_head"}, 2, tcfg, said.append) == base
    assert said == ["note: --init-from base-dir: the model comes from the base as it is; ignoring --n-head 2 (the "
                    "base has 4), --n-layer 8 (the base has 4)"]
    said.clear()
    assert base_config(base, ModelConfig(n_layer=4), {"n_layer"}, 2, tcfg, said.append) == base  # same value
    assert base_config(base, ModelConfig(n_layer=8), set(), 2, tcfg, said.append) == base  # a preset's, not a flag
    assert said == []
    cfg = base_config(base, ModelConfig(doc_mask=True, doc_positions="restart"), {"doc_mask", "doc_positions"}, 7,
                      tcfg)
    assert (cfg.doc_mask, cfg.eot_id, cfg.doc_positions, cfg.n_layer) == (True, 7, "restart", 4)
    with pytest.raises(ConfigError, match="--doc-mask with --peft prefix"):
        base_config(base, ModelConfig(doc_mask=True), {"doc_mask"}, 7, TrainConfig(init_from="b", peft="prefix"))


def test_doc_mask_given_to_a_fine_tune_reaches_its_checkpoint(tmp_path):
    """The flag is not dropped on the way: the fine-tuned checkpoint's config carries doc_mask and eot_id."""
    write_code_corpus(tmp_path)
    assert main(train_argv(tmp_path, "base", max_steps=2)) == 0
    assert main(train_argv(tmp_path, "ft", max_steps=2, init_from=tmp_path / "base") + ["--doc-mask"]) == 0
    saved = load_model(str(tmp_path / "ft"), "cpu", torch.float32)[0].cfg
    assert saved.doc_mask and saved.eot_id is not None
