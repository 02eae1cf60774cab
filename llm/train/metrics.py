"""Training telemetry: console progress, JSONL metrics, optional wandb, MFU against a device peak table, loss plot.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token = 6 * N_active +
12 * L * H * D * T (nanoGPT / PaLM; `Transformer.flops_per_token`) and the dense bf16/fp16
tensor-core peak of the detected GPU. A device missing from the table, a CPU, or an fp32
run gives MFU = None ("unknown"), never a guess.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from llm.plotting import PlotSpec, draw

# Dense (no sparsity) bf16/fp16 peak TFLOP/s by device-name fragment (datasheets). Checked in
# order, so a name that contains another (GH200 > H200 > H20, L40S > L40 > L4) comes first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H20", 148.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("H800", 989.0), ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of `device` for `dtype` autocast, or None when unknown (MFU is then reported as unknown)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilisation over `world` devices: flops_per_token * tokens_per_s / (world * peak)."""
    return flops_per_token * tokens_per_s / (world * peak) if peak else None


def fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """Appends one JSON object per record to <out_dir>/metrics.jsonl; mirrors to wandb when enabled.

    On resume (`resume_step`), records past that step (written by the interrupted run after its
    last checkpoint) are dropped first, so the file never holds a step twice.
    """

    def __init__(self, out_dir: str | Path, wandb_mode: str = "off", project: str = "llm", config: dict | None = None,
                 run_id: str | None = None, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        self.run_id = run_id
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            self.rewind(resume_step, keep_events=False)
        if wandb_mode != "off":
            import wandb

            self.wandb = wandb.init(project=project, mode=wandb_mode, config=config, dir=str(out_dir),
                                    id=run_id, resume="allow" if run_id else None)
            self.run_id = self.wandb.id

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items()  # numbers only: event lines carry names too
                            if k not in ("step", "time") and v is not None and not isinstance(v, str)},
                           step=record.get("step"))

    def rewind(self, step: int, keep_events: bool = True) -> None:
        """Drop the records past `step` (a resume or a rollback trains those steps again); `keep_events` keeps the
        {"event": ...} lines, the log of what the trainer did."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and (_step(ln) <= step or (keep_events and '"event"' in ln))]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed run: drop it


def moe_summary(rec: dict) -> str:
    """' | moe (max over layers) name v ...' from the "moe/<layer>/<name>" entries of a record, or ''."""
    worst: dict[str, float] = {}
    for k, v in rec.items():
        if k.startswith("moe/") and isinstance(v, (int, float)):
            name = k.rsplit("/", 1)[-1]
            worst[name] = max(worst.get(name, v), v)
    return (" | moe (max over layers) " + " ".join(f"{k} {v:.3g}" for k, v in worst.items())) if worst else ""


class Progress:
    """Console progress: a tqdm bar on a terminal, else one line every `every` steps; rank 0 only."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout,
                            mininterval=1.0)

    def update(self, rec: dict, eta_s: float | None, extra: dict[str, float] | None = None) -> None:
        """rec: step, loss, lr, grad_norm, tokens_per_s, mfu (None = unknown); extra: the objective's metrics."""
        if not self.enabled:
            return
        mfu_s = f"{rec['mfu']:.1%}" if rec.get("mfu") is not None else "unknown"
        moe = moe_summary(rec) + "".join(f" | {k} {v:.4g}" for k, v in (extra or {}).items())
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {rec['loss']:.3f} lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.2f} "
                                     f"{rec['tokens_per_s']:,.0f} tok/s mfu {mfu_s}{moe}", refresh=False)
            self.bar.update(rec["step"] - self.bar.n)
        elif rec["step"] % self.every == 0 or rec["step"] == self.total:
            print(f"step {rec['step']:>{len(str(self.total))}}/{self.total} | loss {rec['loss']:.4f} | "
                  f"lr {rec['lr']:.2e} | grad norm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | "
                  f"MFU {mfu_s} | ETA {'?' if eta_s is None else fmt_duration(eta_s)}{moe}", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train and validation loss against step from metrics.jsonl, as a PNG (llm/plotting.py's rules)."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [{"step": r["step"], "loss": r["loss"], "split": "train"} for r in rows if r.get("loss") is not None]
    val = [{"step": r["step"], "loss": r["val_loss"], "split": "val"} for r in rows if "val_loss" in r]
    if not train:
        return None
    spec = PlotSpec(x="step", y="loss", series="split", kind="lines", zero=False, logx=False,
                    title=f"training and validation loss ({metrics_path.parent.name})", ylabel="loss (nats/token)",
                    legend="loss on")
    return draw(out_png, train + val, spec)
