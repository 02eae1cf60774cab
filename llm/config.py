"""Configuration: ModelConfig (+ named presets), DataConfig, TrainConfig.

Every field becomes a command-line flag (`n_layer` -> `--n-layer`) with its help text
taken from the field's metadata; see `add_dataclass_args`. Precedence when building a
config: dataclass defaults < --preset < --config FILE.toml < explicit flags.
Also here: the range checks of the data and training settings (`check_configs`), the type
check of --config values (`check_types`), and the resolved settings written back out
(`describe_config` for the console, `to_toml` for `<out-dir>/config.toml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import select
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration value; the CLIs print its message as one line."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    vocab_size: int = _f(4096, "vocabulary size of the model (set from the tokenizer when training)", flag=False)
    block_size: int = _f(256, "context length in tokens")
    n_layer: int = _f(4, "number of Transformer blocks")
    n_head: int = _f(4, "number of query heads")
    n_kv_head: int | None = _f(None, "number of key/value heads (GQA; 1 = MQA; default = n_head, MHA)")
    n_embd: int = _f(256, "model width")
    head_dim: int | None = _f(None, "per-head width (default n_embd // n_head)")
    intermediate_size: int | None = _f(None, "MLP hidden width (default: 8/3*n_embd rounded up to 64 "
                                             "for SwiGLU, 4*n_embd for GELU)")
    pos_emb: str = _f("rope", "position encoding", choices=("rope", "learned"))
    norm: str = _f("rmsnorm", "normalization", choices=("rmsnorm", "layernorm"))
    mlp: str = _f("swiglu", "MLP type", choices=("swiglu", "gelu"))
    bias: bool = _f(False, "biases in every linear and norm (GPT-2 classic)")
    qkv_bias: bool = _f(False, "biases on the q/k/v projections only (Qwen2)")
    qk_norm: bool = _f(False, "RMSNorm on each query/key head before RoPE (Qwen3)")
    tie_embeddings: bool = _f(False, "share the token embedding and LM-head weights")
    reward_head: bool = _f(False, "a scalar head on the final hidden state (a reward model: --objective reward "
                                  "adds it to its --init-from model)")
    attn_mult: float = _f(1.0, "multiplier on the attention scores q.k / sqrt(head_dim) (µP: sqrt(base head_dim / "
                               "head_dim), i.e. 1/d attention; set by --mup)")
    output_mult: float = _f(1.0, "multiplier on the final hidden state before the LM head, i.e. on the logits "
                                 "(µP: base width / width; set by --mup)")
    rope_theta: float = _f(10000.0, "RoPE base theta")
    rope_scaling: dict | None = _f(None, "RoPE frequency scaling (llama3 style dict); from HF configs")
    norm_eps: float = _f(1e-5, "epsilon of the norms")
    window: int | None = _f(None, "sliding-window attention width (None = full causal)")
    doc_mask: bool = _f(False, "document-masked attention for packed rows: a token attends only to earlier tokens "
                               "of its own document (documents end at the end-of-text token)", runtime=True)
    doc_positions: str = _f("continue", "RoPE positions under --doc-mask: continue along the row, or restart "
                                        "at 0 in each document", choices=("continue", "restart"), runtime=True)
    eot_id: int | None = _f(None, "end-of-text token id (set from the tokenizer with --doc-mask)", flag=False,
                            runtime=True)
    dropout: float = _f(0.0, "dropout on attention output and MLP output", runtime=True)
    pad_vocab_multiple: int = _f(64, "round vocab_size up to a multiple of this (faster matmuls)")
    kernels: str = _f("auto", "op implementation: triton (CUDA or TRITON_INTERPRET=1), torch, or auto",
                      choices=("auto", "triton", "torch"), runtime=True)
    # Mixture of Experts (n_experts = 0 means dense).
    n_experts: int = _f(0, "routed experts per MoE layer (0 = dense model)")
    top_k: int = _f(2, "experts each token is routed to (MoE routing; sampling's top-k is llm sample --top-k)",
                    cli="--moe-top-k")
    n_shared_experts: int = _f(0, "always-active shared experts per MoE layer")
    expert_hidden: int | None = _f(None, "hidden width of each expert (default intermediate_size)")
    first_dense_layers: int = _f(0, "the first N blocks keep a dense MLP")
    score_func: str = _f("softmax", "router scores", choices=("softmax", "sigmoid"))
    norm_topk: bool = _f(True, "renormalize the top-k routing weights to sum to 1")
    route_scale: float = _f(1.0, "scale on the routing weights")
    balance: str = _f("aux", "load balancing: aux loss, aux-loss-free bias, or none",
                      choices=("aux", "bias", "none"))
    aux_coef: float = _f(0.01, "weight of the load-balancing auxiliary loss")
    z_coef: float = _f(0.001, "weight of the router z-loss")
    bias_rate: float = _f(0.001, "update rate of the aux-loss-free routing bias")

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                self.intermediate_size = _round_up(int(8 * self.n_embd / 3), 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.expert_hidden is None:
            self.expert_hidden = self.intermediate_size
        self.validate()

    def architecture(self) -> dict:
        """The fields that shape the weights, without the run-time ones (metadata runtime=True: kernels,
        dropout), which a resumed run or a loaded checkpoint may change freely."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, max(1, self.pad_vocab_multiple))

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        need(self.head_dim >= 1, f"head_dim must be >= 1, got {self.head_dim}")
        need(self.pos_emb != "rope" or self.head_dim % 2 == 0,
             f"RoPE needs an even head_dim, got {self.head_dim}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.window is None or self.window >= 1, f"window must be >= 1, got {self.window}")
        for name in ("pos_emb", "norm", "mlp", "kernels", "score_func", "balance", "doc_positions"):
            choices = _choices(name)
            need(getattr(self, name) in choices, f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_experts:
            need(self.n_experts >= 1, f"n_experts must be >= 0, got {self.n_experts}")
            need(1 <= self.top_k <= self.n_experts,
                 f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
            need(0 <= self.first_dense_layers <= self.n_layer,
                 f"first_dense_layers ({self.first_dense_layers}) must be in [0, n_layer={self.n_layer}]")
            need(self.mlp == "swiglu", "MoE experts are SwiGLU: set mlp='swiglu'")
            need(self.expert_hidden >= 1, f"expert_hidden must be >= 1, got {self.expert_hidden}")
            need(self.route_scale > 0, f"route_scale must be > 0, got {self.route_scale}")
            for name in ("aux_coef", "z_coef", "bias_rate"):
                need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")


@dataclass
class DataConfig:
    dataset: str = _f("pystdlib", "pystdlib (the Python standard library's source, on every machine), "
                                  "shakespeare (downloaded once), tinystories / fineweb-edu (Hugging Face "
                                  "`datasets`, streamed), or a local text file, folder, glob or .jsonl")
    data_dir: str = _f("data", "where prepared token shards are cached")
    vocab_size: int = _f(2048, "BPE vocabulary size to train (ignored with --tokenizer NAME)")
    tokenizer: str | None = _f(None, "use a named tiktoken encoding (gpt2, cl100k_base, o200k_base) "
                                     "instead of training a BPE")
    val_fraction: float = _f(0.05, "share of documents held out for validation")
    text_field: str = _f("text", "JSON field holding the document text (.jsonl files, Hugging Face datasets)")
    max_tokens: int | None = _f(None, "stop preparing the train split after this many tokens (streamed "
                                      "datasets are large; default: all)")
    prep_workers: int = _f(4, "processes tokenizing documents during preparation (the shards are the same "
                              "bytes for any number)")
    score_prompt: bool = _f(False, "fine-tuning data: score every token, the prompt too (default: only the answers)")
    sft_pack: bool = _f(False, "fine-tuning data: pack several examples into each block_size row, kept apart by "
                               "document-masked attention (positions restart per example), instead of one padded "
                               "example per row")
    sft_overlong: str = _f("drop", "fine-tuning data: an example longer than the context is dropped or truncated "
                                   "(the count is printed)", choices=("drop", "truncate"))
    pref_negatives: int = _f(4, "embedded stdlib-prefs: wrong answers paired with each training question (one pair "
                                "each); the held-out questions always keep 4, so the held-out pairs do not change")
    pref_dev_fraction: float = _f(0.05, "preference data: share of the TRAINING questions (lines of a .jsonl) carved "
                                        "out as a dev split by a hash of the name, on which the trainer validates "
                                        "and picks its best checkpoint, so the held-out pairs stay a clean test "
                                        "(they do not change); 0: no dev split (validate on the held-out pairs)")


@dataclass
class TrainConfig:
    out_dir: str = _f("out", "where checkpoints and metrics.jsonl go")
    max_steps: int = _f(600, "optimizer steps to train")
    batch_size: int = _f(16, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(3e-4, "learning rate at the end of the cosine decay (lr / 10 when --lr is below 3e-4 and "
                                 "this is not given)")
    warmup_steps: int = _f(50, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = _f(100, "steps between validation-loss evaluations")
    eval_iters: int = _f(20, "batches per validation-loss estimate")
    eval_tasks: str | None = _f(None, "comma-separated lm-eval tasks (names or task YAML paths) scored on rank 0 at "
                                      "every --eval-interval, logged as eval/<task>/<metric> (needs the eval extra)")
    eval_limit: float | None = _f(None, "documents per --eval-tasks task (a fraction of the task if < 1)")
    save_interval: int = _f(200, "steps between checkpoints (a final one is always written)")
    log_interval: int = _f(10, "steps between metric lines in metrics.jsonl")
    seed: int = _f(1337, "random seed (model init and data order)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = _f("auto", "float32, bfloat16 or float16 autocast (auto: bf16 on CUDA if supported, "
                            "else fp32)", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(False, "torch.compile the model")
    wandb: str = _f("off", "Weights & Biases logging", choices=("off", "offline", "online"))
    wandb_project: str = _f("llm", "wandb project name")
    global_batch_tokens: int | None = _f(None, "tokens per optimizer step over all ranks; the planner then picks "
                                               "--grad-accum and, unless given, --batch-size to fit memory")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward (less memory)")
    fsdp: bool = _f(False, "under torchrun, shard parameters, gradients and optimizer state (FSDP2 fully_shard) "
                           "instead of replicating them (DDP)")
    sequence_parallel: bool = _f(False, "with --tp: the residual stream, norms and dropout hold 1/N of the "
                                        "sequence per TP rank (all-gathered before attention / MLP, reduce-scattered "
                                        "after), the loss computed on each rank's tokens")
    tp: int = _f(1, "under torchrun, tensor parallel degree: each block's attention heads and MLP columns split "
                    "over N ranks (DTensor: q/k/v, gate, up column-wise; o, down row-wise; embedding and, for the "
                    "cross-entropy objective, the LM head by vocabulary rows, loss parallel); the ranks form a "
                    "(world/N data-parallel x N) mesh, and more than one data-parallel group needs --fsdp; --resume "
                    "does not inherit it (a TP checkpoint resumes at any --tp)")
    checkpoint_format: str = _f("auto", "single: one model.safetensors + optimizer.safetensors (gathered on rank 0); "
                                        "sharded: torch.distributed.checkpoint, every rank writes its own part, "
                                        "resumable at any world size (python -m llm.checkpoint consolidate makes a "
                                        "single file of it); auto: sharded under torchrun with more than one rank "
                                        "(single for LoRA runs), single otherwise",
                                choices=("auto", "single", "sharded"))
    async_checkpoint: bool = _f(False, "write sharded checkpoints in the background (dcp.async_save on its own gloo "
                                       "group) while training continues; the next save or the end of the run waits "
                                       "for it, and `latest` moves only then")
    ema_decay: float | None = _f(None, "keep an exponential moving average of the trained weights (ema = D * ema + "
                                       "(1 - D) * w after every step; llm/train/ema.py): validated beside the raw "
                                       "weights (val/ema_loss), it picks the best checkpoint and is saved in every "
                                       "checkpoint as the loadable checkpoint <ckpt>/ema; resumed exactly")
    keep_last: int = _f(3, "periodic checkpoints to keep (the best-by-validation one is kept too; 0 = all)")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a NaN/Inf loss or gradient")
    deterministic: bool = _f(False, "deterministic algorithms only (bit-exact resume on GPU; slower)")
    init_from: str | None = _f(None, "initialise the weights from this checkpoint or Hugging Face model dir "
                                     "(its architecture and tokenizer are used)")
    objective: str = _f("ce", "what a step optimizes: ce = next-token cross-entropy (on instruction / chat data "
                              "only the answer tokens count), distill = CE plus a divergence from --teacher (which "
                              "picks it alone), reward = a reward model on preference pairs (Bradley-Terry), dpo = "
                              "direct preference optimization against --ref, grpo = online RL with group-relative "
                              "advantages (--reward); see llm/train/objectives/")
    teacher: str | None = _f(None, "distil from this frozen teacher (a checkpoint, a training out-dir, a Hugging Face "
                                   "model dir or a quantized checkpoint) sharing the tokenizer: the loss becomes "
                                   "alpha * CE + (1 - alpha) * T^2 * divergence(teacher, student)")
    distill_alpha: float = _f(0.5, "distillation: weight of the hard-label cross-entropy (the divergence gets "
                                    "1 - alpha)")
    distill_temperature: float = _f(1.0, "distillation: softmax temperature T of both distributions (the divergence "
                                         "is scaled by T^2)")
    distill_loss: str = _f("kl", "distillation divergence: kl = KL(teacher || student), reverse-kl = KL(student || "
                                 "teacher), jsd = Jensen-Shannon", choices=("kl", "reverse-kl", "jsd"))
    ref: str | None = _f(None, "--objective dpo: the frozen reference model (default: a frozen copy of the starting "
                               "policy; with LoRA, the base with the adapters off, no second copy)")
    dpo_beta: float = _f(0.1, "--objective dpo: beta, the strength of the implicit KL penalty to the reference")
    dpo_nll: float = _f(0.0, "--objective dpo: weight of the chosen answers' per-token NLL added to the DPO loss "
                             "(RPO, Pang et al. 2024; TRL's rpo_alpha): keeps the chosen answers likely")
    reward_smoothing: float = _f(0.0, "--objective reward: label smoothing eps of the Bradley-Terry loss, -(1 - eps) "
                                      "log sigmoid(d) - eps log sigmoid(-d) for the margin d = r(chosen) - "
                                      "r(rejected): the loss stops rewarding margins beyond log((1 - eps) / eps)")
    reward: str | None = _f(None, "--objective grpo: the reward function, a built-in (exact_match, prefix_match) or "
                                  "module:function taking (prompt, answer, reference) -> float")
    reward_model: str | None = _f(None, "--objective grpo: score answers with this reward model (a checkpoint "
                                        "trained with --objective reward) instead of --reward; several, comma-"
                                        "separated: an ensemble, the mean of their scores")
    grpo_group: int = _f(4, "--objective grpo: answers sampled per prompt (advantages are relative to the group)")
    grpo_beta: float = _f(0.04, "--objective grpo: weight of the KL penalty to the reference")
    grpo_max_new: int = _f(32, "--objective grpo: most tokens per sampled answer")
    grpo_temperature: float = _f(1.0, "--objective grpo: sampling temperature of the answers")
    lora_rank: int | None = _f(None, "fine-tune with LoRA adapters of this rank, the base frozen (default: full "
                                     "fine-tuning)")
    lora_alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    lora_targets: str = _f("q,v", "projections that get adapters, comma-separated from q,k,v,o,gate,up,down")
    peft: str | None = _f(None, "parameter-efficient fine-tuning, the base frozen: lora (--lora-*), prefix (prefix "
                                "tuning, --prefix-*) or adapter (bottleneck adapters, --adapter-*) (default: lora "
                                "when --lora-rank is given, else full fine-tuning)",
                          choices=("lora", "prefix", "adapter"))
    prefix_tokens: int = _f(16, "prefix tuning: learned key/value rows per layer; they take that many of the "
                                "context's positions")
    prefix_hidden: int = _f(512, "prefix tuning: hidden width of the MLP the rows are trained through (Li & Liang's "
                                 "reparameterization, folded away when saved; 0 = train the rows directly)")
    adapter_dim: int = _f(16, "bottleneck adapters: the bottleneck width")
    adapter_placement: str = _f("houlsby", "bottleneck adapters: houlsby (after the attention and after the MLP of "
                                           "every block) or pfeiffer (after the MLP only)",
                                choices=("houlsby", "pfeiffer"))
    mup: bool = _f(False, "µP (Tensor Programs V): hidden-matrix init std and AdamW lr scaled by base/width, 1/d "
                          "attention and a base/width output multiplier, so learning rates tuned at --mup-base-width "
                          "transfer to wider models")
    mup_base_width: int = _f(256, "µP: the width (n_embd) at which µP equals the standard parametrisation")
    optimizer: str = _f("adamw", "adamw for every weight, or muon: Newton-Schulz-orthogonalised momentum for the "
                                 "hidden matrices, AdamW (at --lr) for embeddings, head, norms, biases",
                        choices=("adamw", "muon"))
    muon_lr: float = _f(0.02, "peak learning rate of the Muon matrices (same warmup and cosine shape as --lr)")
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov)")
    muon_ns_steps: int = _f(5, "Newton-Schulz iterations per Muon update")
    health_interval: int = _f(50, "steps between training-health records (per-layer grad RMS, update/weight ratio, "
                                  "activation RMS, attention max logit and entropy, output logit max; 0 = off)")
    spike_zscore: float = _f(6.0, "skip a step whose loss z-score over the last --spike-window losses exceeds this "
                                  "(0 = off; non-finite losses are always skipped)")
    spike_window: int = _f(50, "good losses the spike z-score is taken over")
    spike_rollback: int = _f(3, "after this many skipped steps in a row, roll back to the last checkpoint and move "
                                "the data past the bad batches (0 = never)")


PRESETS: dict[str, dict] = {
    # Trains in ~4 minutes on 2 CPU cores (make train).
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=192, block_size=128),
    # GPT-2-124M-sized, Llama-style (RoPE, RMSNorm, SwiGLU, GQA).
    "small": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, vocab_size=50304,
                  intermediate_size=2048),
    # Llama-3.2-1B shape.
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192, block_size=2048,
               vocab_size=128256, rope_theta=500000.0, tie_embeddings=True),
    # Classic GPT-2 124M: learned positions, LayerNorm, GELU, biases, tied embeddings.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, pos_emb="learned",
                 norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    # Mixtral-style MoE on the tiny shape: 8 experts, top-2, each half the dense MLP width, so the
    # active parameters per token match `tiny`. Trains on 2 CPU cores in minutes.
    "moe-tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=192, block_size=128, n_experts=8, top_k=2,
                     expert_hidden=256),
    # `small` (GPT-2-124M-sized) with 8 experts top-2 of half width: 124M active of ~310M parameters.
    "moe-small": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, vocab_size=50304,
                      intermediate_size=2048, n_experts=8, top_k=2, expert_hidden=1024),
    # Llama-3-8B and -70B shapes: for `python -m llm.train.plan` (sizing a cluster), not for this machine.
    "8b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, block_size=8192,
               vocab_size=128256, rope_theta=500000.0),
    "70b": dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672, block_size=8192,
                vocab_size=128256, rope_theta=500000.0),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _choices(name: str) -> tuple:
    return next(f.metadata.get("choices") for f in fields(ModelConfig) if f.name == name)


# ----------------------------------------------------------------------------- CLI plumbing


def _base_type(tp):
    """(python type, optional) for a field annotation such as `int | None`."""
    tp = typing.get_type_hints(ModelConfig).get(tp, tp) if isinstance(tp, str) else tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default once: "(default: X)" is added only where it says something (not on a
    required flag, an unset None, an off switch, or a help text that already names its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or action.default == []):
            return text
        return super()._get_help_string(action)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, base: dict | None = None,
                       base_name: str = "", group_of: typing.Callable[[str], str] | None = None) -> None:
    """One flag per field of `cls` (--field-name, or the field's metadata "cli"); defaults are SUPPRESSed so
    only explicit flags override.

    base: values that replace the field defaults when no flag is given (a preset); --help shows
    them as the default, naming `base_name`. group_of: field name -> the --help section it is listed
    under (default: all under `title`).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group_for(name: str) -> argparse._ArgumentGroup:
        t = group_of(name) if group_of else title
        if t not in groups:
            groups[t] = parser.add_argument_group(t)
        return groups[t]

    hints = typing.get_type_hints(cls)
    base = base or {}
    for f in fields(cls):
        tp, optional = _base_type(hints[f.name])
        flag = f.metadata.get("cli") or "--" + f.name.replace("_", "-")
        group = group_for(f.name)
        shown = f"{base[f.name]}, from {base_name}" if f.name in base else f.default
        help_ = f.metadata.get("help", "")
        if shown is not None and "default" not in help_:  # None: unset; a help text may name its own default
            help_ += f" (default: {shown})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if not f.metadata.get("flag", True):
            continue
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is dict:
            continue  # structured fields come from --config files or HF imports, not flags
        else:
            conv = _optional(tp) if optional else tp
            group.add_argument(flag, type=conv, choices=f.metadata.get("choices"), metavar=tp.__name__.upper()
                               if not f.metadata.get("choices") else None, **kw)


def _optional(tp):
    def conv(s: str):
        return None if s.lower() in ("none", "null", "") else tp(s)

    conv.__name__ = tp.__name__
    return conv


def load_toml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict = {}
    for k, v in data.items():  # sections ([model], [train], [data]) are optional
        if isinstance(v, dict) and k in ("model", "train", "data"):
            flat.update(v)
        else:
            flat[k] = v
    if isinstance(flat.get("dataset"), dict):  # a weighted mixture as a table: dataset = {a = 0.7, b = 0.3}
        flat["dataset"] = ",".join(f"{name}:{w}" for name, w in flat["dataset"].items())
    return flat


def build(cls, values: dict):
    """Instantiate `cls` from the keys of `values` that are its fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def known_fields() -> set[str]:
    return {f.name for c in (ModelConfig, DataConfig, TrainConfig) for f in fields(c)}


LEGACY_MODEL_KEYS = {"experts_impl"}  # written by earlier versions; the kernels switch now decides


def model_config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in d.items() if k not in LEGACY_MODEL_KEYS}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown model config keys: {', '.join(sorted(unknown))}")
    return ModelConfig(**d)


# ----------------------------------------------------------------------------- checks and serialisation


def check_types(values: dict, source: str) -> None:
    """TOML values must have their field's type (ints where ints are due, ...)."""
    for cls in (ModelConfig, DataConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in values:
                continue
            tp, optional = _base_type(hints[f.name])
            v = values[f.name]
            ok = (v is None and optional) or (isinstance(v, tp) and not (tp is int and isinstance(v, bool))) or (
                tp is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise ConfigError(f"{source}: {f.name} must be {tp.__name__}, got {v!r}")


def check_configs(d: DataConfig, t: TrainConfig) -> None:
    """One clear ConfigError for an out-of-range data or training setting."""
    rules = [(t.max_steps >= 1, "max_steps must be >= 1"), (t.batch_size >= 1, "batch_size must be >= 1"),
             (t.grad_accum >= 1, "grad_accum must be >= 1"), (t.lr > 0, "lr must be > 0"),
             (0 <= t.min_lr <= t.lr, "min_lr must be in [0, lr]"), (t.warmup_steps >= 0, "warmup_steps must be >= 0"),
             (t.grad_clip >= 0, "grad_clip must be >= 0"), (t.eval_iters >= 1, "eval_iters must be >= 1"),
             (min(t.eval_interval, t.save_interval, t.log_interval) >= 1, "eval/save/log intervals must be >= 1"),
             (t.keep_last >= 0, "keep_last must be >= 0"), (t.muon_lr > 0, "muon_lr must be > 0"),
             (0 <= t.muon_momentum < 1, "muon_momentum must be in [0, 1)"),
             (t.muon_ns_steps >= 1, "muon_ns_steps must be >= 1"),
             (t.mup_base_width >= 1, "mup_base_width must be >= 1"),
             (t.health_interval >= 0, "health_interval must be >= 0"), (t.tp >= 1, "tp must be >= 1"),
             (t.spike_zscore >= 0, "spike_zscore must be >= 0"), (t.spike_window >= 2, "spike_window must be >= 2"),
             (t.spike_rollback >= 0, "spike_rollback must be >= 0"),
             (t.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
             (t.global_batch_tokens is None or t.global_batch_tokens >= 1, "global_batch_tokens must be >= 1"),
             (0 <= d.val_fraction < 1, "val_fraction must be in [0, 1)"), (d.prep_workers >= 1, "prep_workers >= 1"),
             (d.pref_negatives >= 1, f"--pref-negatives must be >= 1, got {d.pref_negatives}"),
             (t.ema_decay is None or 0 < t.ema_decay < 1, f"--ema-decay must be in (0, 1), got {t.ema_decay}"),
             (t.ema_decay is None or not (t.fsdp or t.tp > 1 or t.async_checkpoint or t.checkpoint_format == "sharded"),
              "--ema-decay keeps and saves whole tensors: single-file checkpoints only (drop --fsdp / --tp / "
              "--checkpoint-format sharded / --async-checkpoint)"),
             (0 <= d.pref_dev_fraction < 1, f"--pref-dev-fraction must be in [0, 1), got {d.pref_dev_fraction:g}"),
             (d.max_tokens is None or d.max_tokens >= 1, "max_tokens must be >= 1"),
             (t.lora_rank is None or t.lora_rank >= 1, f"--lora-rank must be >= 1, got {t.lora_rank}"),
             (0 <= t.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
             (t.lora_rank is None or t.optimizer == "adamw", "LoRA adapters train with AdamW: drop --optimizer muon"),
             (t.lora_rank is None or not t.mup, "--mup applies to pretraining from scratch, not to LoRA"),
             (t.peft is None or t.optimizer == "adamw", f"--peft {t.peft} trains with AdamW: drop --optimizer muon"),
             (t.peft is None or not t.mup, f"--mup applies to pretraining from scratch, not to --peft {t.peft}"),
             (t.lora_rank is None or t.peft in (None, "lora"), f"--lora-rank applies to --peft lora, not {t.peft}"),
             (d.sft_overlong in ("drop", "truncate"), "sft_overlong must be drop or truncate"),
             (t.lora_rank is None and t.peft is None or (t.checkpoint_format != "sharded" and not t.async_checkpoint),
              "sharded / async checkpoints are for full training; a PEFT run saves its small adapter as one file"),
             (not t.async_checkpoint or t.checkpoint_format != "single",
              "--async-checkpoint writes sharded checkpoints: drop --checkpoint-format single")]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(msg)


def describe_config(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig, shown: int = 10) -> str:
    """One short line for the console: the settings that differ from the dataclass defaults (the first `shown`
    of them) and where all of them are written (`<out-dir>/config.toml`, see to_toml)."""
    changed = []
    for cfg in (mcfg, dcfg, tcfg):
        for f in fields(cfg):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            v = getattr(cfg, f.name)
            if f.name != "vocab_size" and v != default:  # vocab_size comes from the tokenizer
                changed.append(f"{f.name}={v}")
    more = f", +{len(changed) - shown} more" if len(changed) > shown else ""
    listed = f" ({', '.join(changed[:shown])}{more})" if changed else ""
    return (f"config: {len(changed)} setting(s) differ from the defaults{listed}; every setting: "
            f"{Path(tcfg.out_dir) / 'config.toml'}")


def to_toml(mcfg: ModelConfig, dcfg: DataConfig, tcfg: TrainConfig) -> str:
    """The resolved settings as a --config file (vocab_size of the model comes from the tokenizer)."""
    def val(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items() if x is not None) + "}"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v) if isinstance(v, (int, float)) else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = []
    for name, cfg in (("model", mcfg), ("data", dcfg), ("train", tcfg)):
        out.append(f"[{name}]")
        out += [f"{k} = {val(v)}" for k, v in asdict(cfg).items()
                if v is not None and not (name == "model" and k == "vocab_size")]
    return "\n".join(out) + "\n"


PIPE_CLOSED = 141  # 128 + SIGPIPE: the status a shell reports for a command that a closed pipe ended


def _stdout_pipe_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports POLLERR on its write end)."""
    try:
        fd = sys.stdout.fileno()
        p = select.poll()
        p.register(fd, 0)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: take the error as it
        return True


def guard_pipe(main: typing.Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """main(argv)'s exit status, except that when stdout is a pipe whose reader stopped early
    (`llm train --help | head -3`) the command ends quietly with PIPE_CLOSED instead of a BrokenPipeError
    traceback, as Unix tools do. (Resetting SIGPIPE to its default would do the same, but would also kill the
    server when a client closes its socket.) The rest of stdout goes to /dev/null, so the interpreter's
    last flush has nowhere to fail; a BrokenPipeError from anything but stdout is raised as it is."""
    try:
        try:
            return main(argv)
        finally:  # also after SystemExit (argparse's --help): flush here, where a closed pipe can be caught
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_pipe_closed():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED


def run_main(main: typing.Callable[[list[str] | None], int]) -> typing.NoReturn:
    """The body of a command line's `if __name__ == "__main__":` block: exit with guard_pipe(main)'s status."""
    sys.exit(guard_pipe(main))
