"""A tiny fine-tuning run for the resume tests: python finetune_worker.py CKPT_DIR OUT.pt [delay_s].

Deterministic (seeded model, data and run); ``delay_s`` slows each sample so that a parent
process can kill the run in the middle.
"""
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

import normsurgeon as ns


class SlowData(Dataset):
    def __init__(self, delay: float):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, 8, 8, generator=gen)
        self.y = torch.randint(0, 5, (64,), generator=gen)
        self.delay = delay

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt, out = sys.argv[1], sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    student = ns.convert(model(), to="gn")
    ns.finetune(student, SlowData(delay), steps=48, lr=0.05, batch_size=8, loss="labels", optimizer="sgd",
                checkpoint_dir=ckpt, checkpoint_every=1, seed=3, progress=False)
    torch.save(student.state_dict(), out)
