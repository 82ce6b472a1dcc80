"""Seed path ``_archived.losses.advanced_losses`` → :mod:`Ava.losses.advanced_losses` (``model.loss``)."""

from ...losses.advanced_losses import UncertaintyWeighting, chunked_loss_sum, focal_losses, token_losses

__all__ = ["UncertaintyWeighting", "chunked_loss_sum", "focal_losses", "token_losses"]
