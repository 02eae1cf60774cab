"""Weight-only quantization: the schemes, the quantizers, and the modules that replace nn.Linear.

int8  symmetric, one scale per output channel:  s_n = max_k |w_nk| / 127,  q = round(w / s) in [-127, 127],
      w ~ q * s. Error per weight <= s_n / 2.
int4  asymmetric groups of G inputs (G = 32, 64, 128) along K:  lo, hi = min, max of the group,
      s = (hi - lo) / 15,  z = lo + 8 s,  q = round((w - z) / s) + 8 in [0, 15],  w ~ (q - 8) s + z.
      Error per weight <= s / 2. With a zero point all 16 codes span [lo, hi]; a symmetric code would
      span [-max|w|, max|w|] and waste up to half its levels on groups whose weights are not centred on
      0 (the measured difference is in benchmarks/NOTES.md), and `(q - 8) s + z` is the form torch's CPU
      int4 kernel takes as is. When G does not divide K the last group is shorter (as if K were
      zero-padded to a multiple of G; the padding is never stored).
Scales and offsets are stored in fp16 and the codes are computed from the rounded scale, so the
bound holds for the stored values. Every nn.Linear in the blocks is replaced (attention wqkv/wo,
MLP w1/w2/w3); MoE experts are stacked tensors, not Linears, and stay unquantized. The token
embedding and the output head stay in the source dtype unless `embeddings=True`: the head then gets
the same scheme and the embedding int8 rows (a tied head is untied: both are stored).

The scheme sits in a checkpoint's config.json as "quantization": {"format", "version", "mode",
"group_size", "embeddings"}; `check_scheme` refuses schemes this code does not know.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from kernels import reference as ref
from llm import ops

FORMAT, VERSION = "llm-weight-only", 1
MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.float16


class QuantError(ValueError):
    """A quantization request or a quantized checkpoint this code cannot serve; the message is one line."""


# ----------------------------------------------------------------------------- schemes


def make_scheme(mode: str, group_size: int | None = 64, embeddings: bool = False) -> dict:
    """The config.json record of a scheme; bad mode or group size raise QuantError."""
    if mode not in MODES:
        raise QuantError(f"unknown quantization mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    return {"format": FORMAT, "version": VERSION, "mode": mode, "group_size": group_size if mode == "int4" else None,
            "embeddings": bool(embeddings)}


def check_scheme(scheme: object, source: str = "config.json") -> dict:
    """The scheme of a quantized checkpoint, validated: unknown formats, versions or modes raise one line."""
    if not isinstance(scheme, dict):
        raise QuantError(f"{source}: \"quantization\" must be an object, got {type(scheme).__name__}")
    if scheme.get("format") != FORMAT or scheme.get("version") != VERSION:
        raise QuantError(f"{source}: unknown quantization scheme (format {scheme.get('format')!r} version "
                         f"{scheme.get('version')!r}; this code reads {FORMAT!r} version {VERSION})")
    try:
        return make_scheme(scheme.get("mode"), scheme.get("group_size"), scheme.get("embeddings", False))
    except QuantError as e:
        raise QuantError(f"{source}: {e}") from None


def describe(scheme: dict) -> str:
    """"int4 g64" / "int8" (+ " +embeddings")."""
    s = scheme["mode"] + (f" g{scheme['group_size']}" if scheme["mode"] == "int4" else "")
    return s + (" +embeddings" if scheme.get("embeddings") else "")


def refuse_training(cfg: dict, flag: str) -> None:
    """Training starts from full-precision weights: a quantized checkpoint is refused in one line."""
    if cfg.get("quantization"):
        raise QuantError(f"{flag}: the checkpoint is quantized ({describe(check_scheme(cfg['quantization']))}); "
                         "full training needs the unquantized checkpoint it was made from; LoRA (--lora-rank) "
                         "trains on it")


# ----------------------------------------------------------------------------- tensor quantizers


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q (N, K) int8, s (N,) fp16) with w ~ q * s[:, None]; |w - q s| <= s / 2."""
    w = w.detach().float().contiguous()  # a K-major weight (Transformer.decode_layout) gives N-major codes too
    s = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8).to(SCALE_DTYPE)
    q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q (N, ceil(K/2)) uint8 packed, s, z (N, ceil(K/G)) fp16) with w ~ (q - 8) s + z per group."""
    w = w.detach().float().contiguous()
    N, K = w.shape
    n_groups = -(-K // group_size)
    pad = n_groups * group_size - K
    wg = torch.nn.functional.pad(w, (0, pad)).view(N, n_groups, group_size)
    if pad:  # the padding must not widen the last group's range: repeat a real value of it
        wg[:, -1, group_size - pad:] = wg[:, -1, :1]
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    s = ((hi - lo) / 15.0).clamp_min(1e-8).to(SCALE_DTYPE)
    z = (lo + 8.0 * s.float()).to(SCALE_DTYPE)
    q = torch.round((wg - z.float()[..., None]) / s.float()[..., None] + 8.0).clamp(0, 15).to(torch.uint8)
    q = q.view(N, -1)[:, :K]
    if K % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), s, z


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W stored int8 (per channel) or int4 (groups); x (..., K) -> (..., N).

    Buffers, not parameters (nothing here trains): qweight, scales, zeros (int4), bias. Calls
    ops.int8_linear / ops.int4_linear, which pick Triton, torch's CPU kernel or the reference; when x needs a
    gradient (LoRA adapters train around the frozen codes) through FrozenQuantMatmul, whose backward gives dx.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int | None = None,
                 kernels: str = "auto", device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode, self.kernels = in_features, out_features, mode, kernels
        self.group_size = group_size if mode == "int4" else None
        N, K = out_features, in_features
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, dtype=SCALE_DTYPE, device=device))
            self.zeros = None
        else:
            n_groups = -(-K // group_size)
            self.register_buffer("qweight", torch.empty(N, (K + 1) // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, n_groups, dtype=SCALE_DTYPE, device=device))
            self.register_buffer("zeros", torch.empty(N, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(N, device=device) if bias else None)
        self._cache: dict = {}  # a device-specific repacking the op may keep (torch's CPU int4 layout)

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: str, group_size: int | None, kernels: str) -> QuantLinear:
        w = lin.weight
        m = cls(w.shape[1], w.shape[0], lin.bias is not None, mode, group_size, kernels, device=w.device)
        if mode == "int8":
            m.qweight, m.scales = quantize_int8(w)
        else:
            m.qweight, m.scales, m.zeros = quantize_int4(w, group_size)
        if lin.bias is not None:
            m.bias = lin.bias.detach().clone()
        return m.to(w.dtype)  # fp16-rounded scales, upcast exactly: compute runs in the model's dtype

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (N, K) in the scales' dtype (the model's compute dtype)."""
        if self.mode == "int8":
            w = self.qweight.float() * self.scales.float()[:, None]
        else:
            w = ref.int4_dequant_ref(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)
        return w.to(self.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training adapters around this frozen layer (llm/lora.py)
            dev = x.device.type
            if torch.is_autocast_enabled(dev):  # as F.linear would: the matmul in the autocast dtype
                x = x.to(torch.get_autocast_dtype(dev))
            return FrozenQuantMatmul.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: Tensor) -> Tensor:
        """The forward product through llm.ops (Triton, torch's CPU kernel or the reference); no autograd."""
        if self.mode == "int8":
            return ops.int8_linear(x, self.qweight, self.scales, self.bias, kernels=self.kernels)
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias,
                               kernels=self.kernels, cache=self._cache)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}"


class FrozenQuantMatmul(torch.autograd.Function):
    """y = x W^T + b for a frozen quantized W, differentiable in x only: the forward is the layer's own product
    (the quantized kernels have no backward), the backward dx = dy W dequantizes W for the one GEMM and saves
    nothing but a reference to the layer (its codes), so no full-precision copy of W outlives the step."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        return dy @ ctx.layer.weight.to(dy.dtype), None


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows: E[i] ~ q[i] * s[i]. idx (...) -> (..., C) in the scales' dtype."""

    def __init__(self, num: int, dim: int, device=None) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.empty(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        m = cls(*emb.weight.shape, device=emb.weight.device)
        m.qweight, m.scales = quantize_int8(emb.weight)
        return m.to(emb.weight.dtype)

    @property
    def weight(self) -> Tensor:
        return (self.qweight.float() * self.scales.float()[:, None]).to(self.scales.dtype)

    def forward(self, idx: Tensor) -> Tensor:
        return self.qweight[idx].to(self.scales.dtype) * self.scales[idx][..., None]


# ----------------------------------------------------------------------------- model transforms


def _block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) for every nn.Linear inside model.blocks."""
    out = []
    for parent in model.blocks.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                out.append((parent, name, child))
    return out


def quantize_model(model: nn.Module, scheme: dict) -> nn.Module:
    """Replace, in place, the block Linears (and with scheme["embeddings"] the head and embedding) by
    quantized modules computed from the current weights; returns the model (its cfg untied if needed)."""
    mode, g, kernels = scheme["mode"], scheme["group_size"], model.cfg.kernels
    for parent, name, lin in _block_linears(model):
        setattr(parent, name, QuantLinear.from_linear(lin, mode, g, kernels))
    if scheme["embeddings"]:
        model.lm_head = QuantLinear.from_linear(model.lm_head, mode, g, kernels)
        model.tok_emb = QuantEmbedding.from_embedding(model.tok_emb)
        model.cfg = replace(model.cfg, tie_embeddings=False)  # both are stored now
    model.quantization = scheme
    return model


def dense_numel(model: nn.Module) -> int:
    """The parameters a model computes with, each quantized weight counted as the dense (N, K) it stands for."""
    q = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
            for m in model.modules() if isinstance(m, QuantLinear))
    e = sum(m.qweight.numel() for m in model.modules() if isinstance(m, QuantEmbedding))
    return sum(p.numel() for p in model.parameters()) + q + e


def storage_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict to save: scales and offsets in fp16 (exact: they were rounded to fp16 when quantized)."""
    names = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
             for b in ("scales", "zeros")}
    return {k: v.to(SCALE_DTYPE) if k in names else v for k, v in model.state_dict().items()}


def prepare_quantized(model: nn.Module, scheme: dict) -> nn.Module:
    """Swap in empty quantized modules (same devices, e.g. meta) for a quantized checkpoint to load into."""
    mode, g, kernels = scheme["mode"], scheme["group_size"], model.cfg.kernels
    for parent, name, lin in _block_linears(model):
        setattr(parent, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, mode, g, kernels,
                                          device=lin.weight.device))
    if scheme["embeddings"]:
        h = model.lm_head
        model.lm_head = QuantLinear(h.in_features, h.out_features, h.bias is not None, mode, g, kernels,
                                    device=h.weight.device)
        model.tok_emb = QuantEmbedding(*model.tok_emb.weight.shape, device=model.tok_emb.weight.device)
    model.quantization = scheme
    return model


def quantize_loaded(model: nn.Module, cfg: dict, scheme: dict) -> nn.Module:
    """`--quantize` at load: quantize an unquantized model; a model already in this scheme is kept; one
    already quantized differently is refused (re-quantizing codes would stack both errors)."""
    have = cfg.get("quantization")
    if have:
        have = check_scheme(have)
        if have != scheme:
            raise QuantError(f"--quantize {describe(scheme)}: the checkpoint is already quantized ({describe(have)}); "
                             "pass its unquantized source, or drop --quantize")
        return model
    return quantize_model(model, scheme)
