"""What rank 0 shows and records while a run goes: a tqdm bar and metrics.jsonl."""

import json
from pathlib import Path

from tqdm.auto import tqdm


class RunLog:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        shown = {k: row[k] for k in ("train_loss", "eval_loss", "lr", "tokens_per_s") if k in row}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=True)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
