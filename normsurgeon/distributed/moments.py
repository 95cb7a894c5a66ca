"""Batch statistics over every rank of a process group: one all-gather forward, one all-reduce backward.

Each rank holds K pieces x_k of shape (n_k, C, P) (K = 1 for BatchNorm; one piece per domain for
DSBN; any n_k may be 0). Per piece the rank sends its sufficient statistics
    m_{r,k} = n_k·P (values per statistic),   s_{r,k} = Σ x (C,),   q_{r,k} = Σ (x − s/m)² (C,)
as one (K, 1 + 2C) tensor in **one all-gather**, with the counts, so uneven and empty ranks are
exact. Every rank then combines the same gathered rows in the same order (Chan et al.'s parallel
variance), so the results are bit-identical on every rank:
    M_k = Σ_r m_{r,k},   μ_k = Σ_r s_{r,k} / M_k,
    σ²_k = (Σ_r q_{r,k} + Σ_r m_{r,k} (s_{r,k}/m_{r,k} − μ_k)²) / M_k      (biased, as BatchNorm).
Centred moments, not Σx²: no E[x²] − μ² cancellation in float32.

Backward: the loss is the sum of every rank's loss, so ∂L/∂μ_k and ∂L/∂σ²_k are the sums of the
ranks' local gradients g_μ, g_σ² (C,) each; they go out in **one all-reduce** of (K, 2C), then
    ∂L/∂x = G_μ / M_k + G_σ² · 2(x − μ_k) / M_k      (the Σ(x − μ) term of ∂σ²/∂μ is zero).
This is SyncBatchNorm's protocol (torch/nn/modules/_functions.py) in its own words: it works on
any backend with all_gather/all_reduce (gloo on CPU, nccl on GPU). Every rank must call it for
the same layers in the same order, also a rank whose pieces are all empty.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def require_process_group(process_group=None, what: str = "synchronized statistics") -> None:
    """Raise a RuntimeError that says how to start one when no process group is initialized."""
    if not dist.is_available():
        raise RuntimeError(f"{what} need torch.distributed, which this build of torch lacks "
                           f"(torch.distributed.is_available() is False). Use a torch build with distributed "
                           f"support, or normsurgeon.unsync(model) for a single process.")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} need an initialized torch.distributed process group, and there is none. Start the "
            f"script with `torchrun --nproc-per-node N script.py` and call "
            f"torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) before the first forward; "
            f"for a single process use normsurgeon.unsync(model).")


def world_size(process_group=None) -> int:
    return dist.get_world_size(process_group)


def _local_sums(piece: torch.Tensor) -> torch.Tensor:
    """(n, C, P) → (1 + 2C,): [n·P, Σx, Σ(x − mean)²], zeros for an empty piece."""
    n, c, p = piece.shape
    count = n * p
    total = piece.sum(dim=(0, 2))
    centred = (piece - (total / max(count, 1)).view(1, c, 1)).square().sum(dim=(0, 2))
    return torch.cat([total.new_full((1,), float(count)), total, centred])


class SyncedMoments(torch.autograd.Function):
    """(process_group, x_1 … x_K each (n_k, C, P)) → (μ (K, C), σ² (K, C) biased, M (K,) counts).

    Equations in the module docstring; M is not differentiable. One all-gather in the forward,
    one all-reduce in the backward.
    """

    @staticmethod
    def forward(ctx, process_group, *pieces):
        c = pieces[0].shape[1]
        payload = torch.stack([_local_sums(p) for p in pieces])  # (K, 1 + 2C)
        gathered = [torch.empty_like(payload) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, payload.contiguous(), group=process_group)
        rows = torch.stack(gathered)  # (W, K, 1 + 2C), the same on every rank
        counts, sums, centred = rows[..., 0], rows[..., 1:1 + c], rows[..., 1 + c:]
        total = counts.sum(0)  # (K,)
        mean = sums.sum(0) / total.clamp_min(1).unsqueeze(1)
        local_mean = sums / counts.clamp_min(1).unsqueeze(2)
        spread = (counts.unsqueeze(2) * (local_mean - mean).square()).sum(0)
        var = (centred.sum(0) + spread) / total.clamp_min(1).unsqueeze(1)
        ctx.process_group = process_group
        ctx.save_for_backward(mean, total, *pieces)
        ctx.mark_non_differentiable(total)
        return mean, var, total

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        mean, total, *pieces = ctx.saved_tensors
        both = torch.cat([grad_mean, grad_var], dim=1).contiguous()  # (K, 2C): the ranks' local sums
        dist.all_reduce(both, group=ctx.process_group)
        c = mean.shape[1]
        scale = 1.0 / total.clamp_min(1).unsqueeze(1)  # (K, 1)
        g_mean, g_var = both[:, :c] * scale, both[:, c:] * (2 * scale)
        grads = []
        for k, piece in enumerate(pieces):
            grads.append((piece - mean[k].view(1, c, 1)) * g_var[k].view(1, c, 1) + g_mean[k].view(1, c, 1))
        return (None, *grads)


def synced_moments(process_group, *pieces: torch.Tensor):
    """μ (K, C), σ² (K, C), M (K,) over every rank's pieces (see ``SyncedMoments``)."""
    return SyncedMoments.apply(process_group, *pieces)
