"""Gradient surgery: combine the gradients of several loss terms into one update direction.

Each method takes the per-term gradients flattened over the shared parameters, ``grads_JP``
(J loss terms, P parameters), and returns one ``(P,)`` direction:

- PCGrad (Yu et al. 2020): project each g_i off every g_j it conflicts with (g_i·g_j < 0), in
  random order, then sum.
- GradDrop (Chen et al. 2020): per coordinate, sign purity P = ½(1 + Σg / Σ|g|); keep the positive
  parts with probability P and the negative parts otherwise, so each coordinate's kept gradients
  share one sign.
- GradNorm (Chen et al. 2018): learned loss weights w_i (Σw = J) so that the weighted gradient
  norms track each term's relative training rate, with strength α.
- CAGrad (Liu et al. 2021): the d in the ball ‖d − g0‖ ≤ c‖g0‖ around the mean gradient g0 that
  maximises the worst term's improvement min_i g_i·d (solved in its dual over the simplex).
- MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the g_i.

CAGrad's and MGDA's directions live at the scale of a *mean* of the gradients;
:class:`GradientSurgery` multiplies them by J so that with no conflict they match the plain sum
the default path (one backward of the summed loss) would give.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import SurgeryConfig


def pcgrad(grads_JP: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projected per-term gradients.

    Args:
        grads_JP: ``(J, P)`` per-term gradients.
        generator: RNG for the order in which conflicts are projected away.

    Returns:
        ``(J, P)`` projected gradients; their sum is the update direction.
    """
    projected = grads_JP.clone()
    k = grads_JP.size(0)
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ grads_JP[j]
            if dot < 0:
                projected[i] -= dot / grads_JP[j].square().sum().clamp(min=1e-20) * grads_JP[j]
    return projected


def graddrop(grads_JP: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """GradDrop's sign-consistent sum.

    Args:
        grads_JP: ``(J, P)`` per-term gradients.
        generator: RNG of the per-coordinate uniform draw.

    Returns:
        ``(P,)``: per coordinate, the sum of the positive parts (with probability P) or of the
        negative parts (otherwise).
    """
    purity_P = 0.5 * (1.0 + grads_JP.sum(0) / grads_JP.abs().sum(0).clamp(min=1e-20))
    u_P = torch.rand(purity_P.shape, generator=generator, dtype=purity_P.dtype).to(purity_P.device)
    keep_positive_P = purity_P > u_P
    mask_JP = torch.where(keep_positive_P, grads_JP > 0, grads_JP < 0)
    return (grads_JP * mask_JP).sum(0)


def _simplex_min(objective, k: int, dtype: torch.dtype, steps: int = 300) -> torch.Tensor:
    """argmin over the probability simplex of a smooth ``objective(w)`` (softmax-parametrised Adam)."""
    z = torch.zeros(k, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        objective(torch.softmax(z, 0)).backward()
        opt.step()
    return torch.softmax(z, 0).detach()


def mgda(grads_JP: torch.Tensor) -> torch.Tensor:
    """Min-norm point of the convex hull of the rows of ``grads_JP``.

    Two terms have the closed form α = clip((g2 − g1)·g2 / ‖g1 − g2‖², 0, 1); more terms minimise
    wᵀGw over the simplex on the J×J Gram matrix G.

    Args:
        grads_JP: ``(J, P)`` per-term gradients.

    Returns:
        ``(P,)`` the min-norm convex combination Σ w_i g_i.
    """
    gram_JJ = (grads_JP @ grads_JP.T).double()
    if grads_JP.size(0) == 2:
        g11, g12, g22 = gram_JJ[0, 0], gram_JJ[0, 1], gram_JJ[1, 1]
        alpha = ((g22 - g12) / (g11 - 2 * g12 + g22).clamp(min=1e-20)).clamp(0.0, 1.0)
        weights = torch.stack([alpha, 1 - alpha])
    else:
        weights = _simplex_min(lambda w: w @ gram_JJ @ w, grads_JP.size(0), torch.float64)
    return weights.to(grads_JP.dtype) @ grads_JP


def cagrad(grads_JP: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """Conflict-averse direction: max_d min_i g_i·d subject to ‖d − g0‖ ≤ c‖g0‖.

    Dual (Liu et al. 2021, eq. 5): w* = argmin_{w∈Δ} g_wᵀg0 + c‖g0‖·‖g_w‖, then
    d = g0 + c‖g0‖ · g_w / ‖g_w‖.

    Args:
        grads_JP: ``(J, P)`` per-term gradients.
        c: radius of the ball relative to ‖g0‖ (0 gives the mean gradient).

    Returns:
        ``(P,)`` the direction d (at the scale of the mean gradient).
    """
    k = grads_JP.size(0)
    gram_JJ = (grads_JP @ grads_JP.T).double()
    g0 = grads_JP.mean(0)
    radius = c * (gram_JJ.mean().clamp(min=0).sqrt())  # c·‖g0‖, ‖g0‖² = mean of the Gram matrix
    if radius == 0:
        return g0
    b_J = gram_JJ.mean(1)  # g_iᵀg0
    weights = _simplex_min(lambda w: w @ b_J + radius * (w @ gram_JJ @ w + 1e-20).sqrt(), k, torch.float64)
    g_w = weights.to(grads_JP.dtype) @ grads_JP
    return g0 + float(radius) * g_w / g_w.norm().clamp(min=1e-20)


class GradNormWeights:
    """GradNorm's learned loss weights w_i, renormalised to Σw = J after each update.

    Args:
        num_terms: J.
        alpha: strength α of the pull towards equal relative training rates.
        lr: learning rate of the weights.
    """

    def __init__(self, num_terms: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        self.alpha = alpha
        self.lr = lr
        self.weights = torch.ones(num_terms, dtype=torch.float64)
        self.initial_losses: torch.Tensor | None = None

    def combine(self, grads_JP: torch.Tensor, losses_J: torch.Tensor) -> torch.Tensor:
        """Σ w_i g_i with the current weights, then one GradNorm update of the weights.

        Args:
            grads_JP: ``(J, P)`` per-term gradients (unweighted).
            losses_J: ``(J,)`` current loss values.

        Returns:
            ``(P,)`` the weighted sum of the gradients.
        """
        losses_J = losses_J.detach().double().cpu()
        if self.initial_losses is None:
            self.initial_losses = losses_J.clamp(min=1e-12)
        combined = self.weights.to(grads_JP.dtype).to(grads_JP.device) @ grads_JP
        norms_J = grads_JP.norm(dim=1).double().cpu()  # ‖∇L_i‖; G_i = w_i‖∇L_i‖
        weighted_J = self.weights * norms_J
        ratio_J = losses_J / self.initial_losses
        rate_J = ratio_J / ratio_J.mean()  # inverse training rate r_i
        target_J = weighted_J.mean() * rate_J**self.alpha  # held constant (as in the paper)
        # d/dw_i Σ_j |G_j − target_j| = sign(G_i − target_i)·‖∇L_i‖
        self.weights = (self.weights - self.lr * torch.sign(weighted_J - target_J) * norms_J).clamp(min=1e-3)
        self.weights = self.weights * len(self.weights) / self.weights.sum()
        return combined

    def state_dict(self) -> dict[str, Any]:
        """Weights and initial losses (tensors; ``weights_only``-safe)."""
        return {"weights": self.weights.clone(), "initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.weights = state["weights"].clone()
        self.initial_losses = state["initial_losses"]


class GradientSurgery:
    """The method of ``gradient.surgery`` as one object the trainer calls per micro-batch.

    Args:
        config: the surgery section (method, terms, method parameters).
        seed: seed of the RNG used by PCGrad's order and GradDrop's draws.
    """

    def __init__(self, config: SurgeryConfig, seed: int = 0) -> None:
        self.config = config
        self.terms = list(dict.fromkeys(config.terms))
        self.generator = torch.Generator().manual_seed(seed)
        self.gradnorm = (GradNormWeights(len(self.terms), config.gradnorm_alpha, config.gradnorm_lr)
                         if config.method == "gradnorm" else None)

    def combine(self, grads_JP: torch.Tensor, losses_J: torch.Tensor) -> torch.Tensor:
        """One update direction from the per-term gradients.

        Args:
            grads_JP: ``(J, P)`` gradients of the terms in ``self.terms`` order.
            losses_J: ``(J,)`` the terms' values (GradNorm reads them).

        Returns:
            ``(P,)`` direction at the scale of the summed loss's gradient.
        """
        method, k = self.config.method, grads_JP.size(0)
        if method == "pcgrad":
            return pcgrad(grads_JP, self.generator).sum(0)
        if method == "graddrop":
            return graddrop(grads_JP, self.generator)
        if method == "gradnorm":
            return self.gradnorm.combine(grads_JP, losses_J)
        if method == "cagrad":
            return k * cagrad(grads_JP, self.config.cagrad_c)
        if method == "mgda":
            return k * mgda(grads_JP)
        return grads_JP.sum(0)

    def state_dict(self) -> dict[str, Any]:
        """RNG and GradNorm state (``weights_only``-safe)."""
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.gradnorm is not None:
            state["gradnorm"] = self.gradnorm.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        if self.gradnorm is not None and "gradnorm" in state:
            self.gradnorm.load_state_dict(state["gradnorm"])


def build_surgery(config: SurgeryConfig, seed: int) -> GradientSurgery | None:
    """A :class:`GradientSurgery` when ``config.method`` is not ``none``, else None.

    Args:
        config: ``gradient.surgery``.
        seed: ``run.seed``.

    Returns:
        The surgery object or None.
    """
    return None if config.method == "none" else GradientSurgery(config, seed)


def surgery_backward(model: torch.nn.Module, surgery: GradientSurgery, named_losses: dict[str, torch.Tensor],
                     accum: int) -> None:
    """Per-term backward on the trainable parameters, combined by ``surgery`` into ``p.grad``.

    Terms listed in ``gradient.surgery.terms`` get their own gradient (one autograd pass each);
    their combined direction, plus the plain gradient of every unlisted term, is added to the
    gradients already accumulated, divided by ``accum`` as the plain backward would be.

    Args:
        model: the model whose parameters receive the gradient.
        surgery: the configured method.
        named_losses: ``{"lm_loss": ..., **aux_losses}`` of this micro-batch.
        accum: micro-batches per optimizer step.
    """
    terms = [named_losses[name] for name in surgery.terms]
    params = [p for p in model.parameters() if p.requires_grad]
    flat = []
    for term in terms:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(params, grads)]))
    combined_P = surgery.combine(torch.stack(flat), torch.stack([t.detach() for t in terms]))
    rest = [value for name, value in named_losses.items() if name not in surgery.terms]
    if rest:  # unlisted terms keep their plain gradient
        (sum(rest) / accum).backward(retain_graph=True)
    offset = 0
    for p in params:
        g = combined_P[offset:offset + p.numel()].view_as(p) / accum
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        offset += p.numel()
