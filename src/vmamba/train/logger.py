"""Progress display (tqdm on a terminal, plain lines otherwise) and per-epoch metrics files."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any


class Progress:
    """Per-step progress of one epoch: a tqdm bar on a TTY, a plain line every ``interval`` steps otherwise."""

    def __init__(self, total: int, desc: str, interval: int, enabled: bool = True, stream=None) -> None:
        self.total, self.desc, self.interval, self.enabled = total, desc, max(1, interval), enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.start = time.perf_counter()
        if enabled and _is_tty(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines without tqdm
                return
            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        text = {k: _fmt(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif step % self.interval == 0 or step == self.total:
            shown = " ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.desc} step {step}/{self.total} {shown}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class MetricsWriter:
    """Appends one record per epoch to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if installed)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (left by a run killed after logging, before saving)."""
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r.get("epoch", 0) <= epoch]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._rewrite_csv(kept)

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        path = self.out_dir / "metrics.csv"
        if not records:
            path.unlink(missing_ok=True)
            return
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.out_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.tb is not None:
            step = int(record.get("epoch", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
