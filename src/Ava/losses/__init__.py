"""Loss functions: the LM objective (cross-entropy, label smoothing, focal, chunked, fused with the
output head), the MoE balancing terms and their coefficient schedules, multi-token prediction,
uncertainty weighting, and the total (``deepseek_loss``).

Losses import only ``torch`` and ``config/``.
"""

from .advanced_losses import (
    UncertaintyWeighting,
    causal_lm_objective,
    chunked_loss_sum,
    focal_losses,
    token_losses,
)
from .balancing import global_balancing_loss, load_balancing_loss, router_z_loss, sequence_balancing_loss
from .coefficient_schedules import BALANCING_COEFFICIENTS, balancing_coefficients, scheduled_value
from .fused_head import fused_causal_lm_objective, fused_linear_cross_entropy_sum, use_fused_head
from .deepseek_loss import LossTerms, assemble_losses, mtp_loss, shift_labels, total_loss
from .language_modeling import IGNORE_INDEX, causal_lm_loss

__all__ = [
    "BALANCING_COEFFICIENTS", "IGNORE_INDEX", "LossTerms", "UncertaintyWeighting", "assemble_losses",
    "balancing_coefficients", "causal_lm_loss", "causal_lm_objective", "chunked_loss_sum", "focal_losses",
    "fused_causal_lm_objective", "fused_linear_cross_entropy_sum", "global_balancing_loss", "load_balancing_loss",
    "mtp_loss", "router_z_loss", "scheduled_value", "sequence_balancing_loss", "shift_labels", "token_losses",
    "total_loss", "use_fused_head",
]
