"""Training telemetry: JSONL metrics, optional wandb, MFU against a device peak table, loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s by device-name fragment (datasheet); checked in order, specific first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device`, or None when unknown (MFU is then reported as unknown, not guessed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


class MetricsLogger:
    """Appends one JSON object per record to <out_dir>/metrics.jsonl; mirrors to wandb when enabled."""

    def __init__(self, out_dir: str | Path, wandb_mode: str = "off", project: str = "llm", config: dict | None = None,
                 run_id: str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        self.run_id = run_id
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train/val loss against step from metrics.jsonl, as a PNG."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
