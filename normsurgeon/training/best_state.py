"""The best evaluated state of a fine-tuning run (``finetune(..., eval_data=..., keep_best=True)``).

Every evaluation offers the model's current state with its metrics. States are ranked by
    labels (loss "labels"/"both", labeled eval_data): (eval_accuracy, −eval_loss)
    otherwise (distillation):                       (eval_agreement, −eval_kl)
compared lexicographically: the second entry breaks ties of the first, which are common
with few held-out images. The state before the first step is evaluated too, so the run ends
no worse (on ``eval_data``) than it started. A copy of the best state_dict is kept on the
CPU and goes into checkpoints, so a resumed run ranks against the same best.
"""
from __future__ import annotations

from torch import nn

MIN_EVAL_IMAGES = 8


def rank_key(metrics: dict, labels_first: bool) -> tuple[str, str] | None:
    """(primary, tie-break) metric names used to rank ``metrics``, or None when nothing ranks."""
    by_labels = ("eval_accuracy", "eval_loss")
    by_teacher = ("eval_agreement", "eval_kl")
    order = (by_labels, by_teacher) if labels_first else (by_teacher, by_labels)
    return next((key for key in order if key[0] in metrics), None)


class BestState:
    """The best (step, score, state) seen so far."""

    def __init__(self, labels_first: bool):
        self.labels_first = labels_first
        self.step: int | None = None
        self.score: tuple[float, float] | None = None
        self.metric: str | None = None
        self.state: dict | None = None

    def offer(self, step: int, metrics: dict, model: nn.Module) -> bool:
        """Keep the model's state if its metrics rank above the best so far; True if kept."""
        key = rank_key(metrics, self.labels_first)
        if key is None:
            return False
        score = (float(metrics[key[0]]), -float(metrics[key[1]]))
        if self.score is not None and score <= tuple(self.score):
            return False
        self.step, self.score, self.metric = step, score, key[0]
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)

    def state_dict(self) -> dict:
        return {"step": self.step, "score": self.score, "metric": self.metric, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.step, self.metric, self.state = saved["step"], saved["metric"], saved["state"]
        self.score = tuple(saved["score"]) if saved["score"] is not None else None


def check_eval_size(metrics: dict) -> None:
    """Ranking states on fewer than ``MIN_EVAL_IMAGES`` held-out images is noise: refuse."""
    n = metrics.get("eval_images", 0)
    if n < MIN_EVAL_IMAGES:
        raise ValueError(f"eval_data has {n} image{'s' * (n != 1)}: too few to rank training states (need at least "
                         f"{MIN_EVAL_IMAGES}); give more held-out images, or keep_best=False to keep the last "
                         f"state instead of the best")

