"""Ava: a PyTorch framework for training Mixture-of-Experts language models.

Import the pieces from their modules (``Ava.config``, ``Ava.models``, ``Ava.training``); this
top-level module stays light so ``import Ava`` is fast.

Shape suffixes. Tensors whose shape matters carry their axes as an upper-case suffix
(``x_BTD``, ``gate_up_proj_EFD``) or a ``# (B, T, D)`` comment. One letter means one thing in the
whole package:

==  =====================================================================================
B   batch rows (sequences, prompts or beams)
T   tokens: the positions of a sequence, or in the MoE layers the B·T flattened tokens
L   key/value positions (cached + new) that a query attends over
N   rows of any flattened leading shape (e.g. the B·(T-1) predicted positions of a loss)
D   hidden width
V   vocabulary
H   query heads
G   key/value heads
A   attention head dim (rotary frequencies: A/2)
E   experts
K   experts per token (top-k)
S   token-slots, T·K (slot ``t·K + k`` is token t's k-th choice: "token-major")
U   kept slots (S minus the slots capacity dropping or expert-choice left off)
R   rows of an expert buffer (kept slots plus padding rows)
C   rows per expert in a uniform (E, C, D) expert buffer
I   intermediate width (an expert's or a dense MLP's)
F   fused gate|up width, 2I
M   multi-token-prediction depths
Q   layers (e.g. per-layer expert counts, (Q, E))
J   loss terms (gradient surgery)
P   parameters, flattened into one vector
Z   rows in one chunk of a chunked computation
==  =====================================================================================
"""

__version__ = "0.1.0"
