"""The Diffusion-DPO loss of the StepVideo recipe, in the released weights' timestep convention.

For a preference pair (winner w, loser l) that shares the prompt, the timestep t and the noise:

    L_x      = per-sample flow-matching MSE of a model on x (actor θ or frozen reference)
    r_θ(x)   = −loss_beta · 1000·(1 − t) · L_θ(x)         (the same for the reference)
    Δ        = (r_θ(w) − r_θ(l)) − (r_ref(w) − r_ref(l))
    loss     = −log σ(β·Δ)·(1 − ls) − log σ(−β·Δ)·ls        (× the pair weight) + pref_ftx · (−r_θ(w))

MindSpeed-MM scales by its integer timestep, which is 1000 × the noise level; the noise level in
this project's convention is 1 − t, so the factor is the same. β is --dpo-beta, ls is
--dpo-label-smoothing, pref_ftx is --pref-ftx and loss_beta is `dpo.loss_beta` in the model JSON.
Unlike MindSpeed-MM, the loser is noised at the same t as the winner (its code draws a fresh t for
the loser and then feeds the winner's t to the model).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def dpo_loss(actor_w: torch.Tensor, actor_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             t: torch.Tensor, loss_beta: float, beta: float, label_smoothing: float = 0.0, pref_ftx: float = 0.0,
             weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-pair losses (b,) and metrics; all inputs are (b,) tensors (see the module docstring)."""
    scale = loss_beta * 1000.0 * (1.0 - t.float())
    reward_w, reward_l = -scale * actor_w, -scale * actor_l
    ref_reward_w, ref_reward_l = -scale * ref_w, -scale * ref_l
    delta = (reward_w - reward_l) - (ref_reward_w - ref_reward_l)
    loss = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    if weights is not None:
        loss = loss * weights.to(loss)
    if pref_ftx:
        loss = loss + pref_ftx * (-reward_w)
    chosen = beta * (reward_w - ref_reward_w).detach()
    rejected = beta * (reward_l - ref_reward_l).detach()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
    }
    return loss, metrics
