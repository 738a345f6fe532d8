"""The DINO loss: cross-entropy between teacher targets and student predictions over crop pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multicrop_cross_entropy(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Mean of ``H(p_t(a), p_s(b))`` over every (teacher view ``a``, student view ``b``) with ``a != b``.

    ``student_logits``: ``[n_crops * B, K]`` (views stacked, the global ones first);
    ``targets``: teacher probabilities ``[n_global * B, K]``. Each pair's cross-entropy is averaged
    over the batch, then over the pairs, as in the paper's Eq. 3 and the reference ``DINOLoss``.
    All pairs are computed in one contraction instead of a Python loop over pairs, and the
    diagonal (``a == b``) is weighted out rather than indexed out: a boolean index has a
    data-dependent size, which makes the host wait for a GPU twice a step (forward and backward).
    """
    n_global = targets.shape[0] * n_crops // student_logits.shape[0]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    log_p = log_p.reshape(n_crops, -1, log_p.shape[-1])
    q = targets.float().reshape(n_global, -1, targets.shape[-1])
    batch = q.shape[1]
    # pair[a, b] = sum_i sum_k q[a, i, k] * log_p[b, i, k]
    pair = torch.einsum("aik,bik->ab", q, log_p) / batch
    other_view = 1.0 - torch.eye(n_global, n_crops, dtype=pair.dtype, device=pair.device)
    return -(pair * other_view).sum() / (n_global * (n_crops - 1))
