"""Metrics to CSV (and TensorBoard when installed), throughput and model FLOPs utilisation."""

import csv
import os
from pathlib import Path

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the user's `--peak-flops`, else the table, else None (CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():  # the more specific names come first
        if key in name:
            return flops
    return None


class CSVLog:
    """Rows of metrics appended to a CSV file; the header is fixed by the first row written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.exists():
            with open(self.path) as f:
                self.columns = next(csv.reader(f), None)

    def truncate_after(self, step: int) -> None:
        """Forget rows past `step` (a resumed run recomputes them)."""
        if not self.path.exists():
            return
        with open(self.path) as f:
            rows = list(csv.DictReader(f))
        # A row cut short by a kill has missing fields: drop it with the rows past `step`.
        kept = [r for r in rows if None not in r.values() and int(float(r["step"])) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def read_csv(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


class TensorBoard:
    """A SummaryWriter when tensorboard is installed; otherwise does nothing."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: dict, step: int, prefix: str) -> None:
        if self.writer:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
