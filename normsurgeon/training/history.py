"""``History``: the record of a fine-tuning run, one dict per logged step and per evaluation."""
from __future__ import annotations

import csv
import json
from pathlib import Path


class History(list):
    """One dict per logged step (loss, lr, throughput, clocks) and per evaluation (eval_*)."""

    def frame(self):
        import pandas as pd

        return pd.DataFrame(list(self))

    def last(self, key: str):
        """The most recent value of ``key`` (e.g. "eval_agreement"), or None."""
        return next((row[key] for row in reversed(self) if key in row), None)

    def save(self, stem) -> list[Path]:
        """Write ``<stem>.json`` and ``<stem>.csv`` (folders created as needed); returns both paths.

        ``history.save("runs/a/history")`` → runs/a/history.json, runs/a/history.csv.
        """
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")]
        paths[0].write_text(json.dumps(list(self), indent=1))
        keys = list(dict.fromkeys(k for row in self for k in row))
        with open(paths[1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self)
        return paths
