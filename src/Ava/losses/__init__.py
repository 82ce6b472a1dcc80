"""Loss functions: causal LM cross-entropy and the MoE balancing terms.

Losses import only ``torch`` and ``config/``.
"""

from .balancing import global_balancing_loss, load_balancing_loss, router_z_loss, sequence_balancing_loss
from .language_modeling import IGNORE_INDEX, causal_lm_loss

__all__ = [
    "IGNORE_INDEX", "causal_lm_loss", "global_balancing_loss", "load_balancing_loss", "router_z_loss",
    "sequence_balancing_loss",
]
