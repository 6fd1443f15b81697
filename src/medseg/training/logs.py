"""Training logs: CSV, TensorBoard and a loss/Dice curve PNG."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no global backend, no window, faster import

from medseg.imaging.atomic import atomic_path


class TrainingLog:
    """Keeps epoch rows; rewrites the CSV and the curve on every epoch (cheap, and resume-safe)."""

    def __init__(
        self, folder: str | os.PathLike, rows: list[dict] | None = None, *, tensorboard: bool = True
    ) -> None:
        self.folder = Path(folder)
        self.rows: list[dict] = list(rows or [])
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"))
            except Exception:  # tensorboard missing or broken: CSV and PNG still work
                self.writer = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        self.write_csv()
        self.plot()

    def write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.folder / "log.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self) -> None:
        if not self.rows:
            return
        epochs = [r["epoch"] for r in self.rows]
        fig = Figure(figsize=(10, 3.6))
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(epochs, [r.get("train_loss", float("nan")) for r in self.rows], label="train loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.legend()
        dice_keys = [k for k in self.rows[-1] if k.startswith("val_dice_") and k != "val_dice_mean"]
        for key in dice_keys:
            ax2.plot(
                epochs,
                [r.get(key, float("nan")) for r in self.rows],
                label=key.removeprefix("val_"),
            )
        ax2.plot(
            epochs,
            [r.get("val_dice_mean", float("nan")) for r in self.rows],
            "k",
            lw=2,
            label="mean Dice",
        )
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation Dice")
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        with atomic_path(self.folder / "curves.png") as tmp:
            fig.savefig(tmp, dpi=90, format="png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
