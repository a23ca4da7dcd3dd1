"""AttnLRP rules as tiny autograd functions (Achtibat et al., ICML 2024; LXT ``efficient`` mode).

AttnLRP in its Input x Gradient formulation keeps the forward pass unchanged and only modifies how
the gradient flows through a few operations; relevance is then ``activation * modified gradient``.
Each rule here defines ``backward`` (used by the reverse engine, :mod:`agdecode.engines.reverse`, for
per-token relevance maps) and ``jvp`` (used only by the ``forward-ad`` engine, which runs
``torch.autograd.forward_ad``); ``jvp`` is the transpose of ``backward``, so both give the same scores.
The default forward engine (:mod:`agdecode.engines.forward`) does not call these functions: it
re-implements the same rules on stacked primal and tangent rows. It is exact because those rules are the
same linear maps, which the tests check against the reverse engine and the reference relevances.

Linear layers, additions, residuals and the softmax keep their ordinary gradient (the epsilon-rule
reduces to the plain gradient in this formulation).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import Function

__all__ = ["identity_rule", "uniform_rule", "stop_gradient", "QUERY_SHARE", "KEY_SHARE", "VALUE_SHARE",
           "GATE_SHARE", "IDENTITY_EPS"]

# The rule constants, defined once for every engine. Uniform rule: a product of N factors gives each
# 1/N of its relevance, so the gradient (tangent) into each factor is divided by N. q.k and the softmax
# make attention a product of four factors for q and k (AttnLRP, Achtibat et al. 2024, Sec. 3.3:
# 1/4 each); attn.v and gate x up are products of two (1/2).
QUERY_SHARE = 4.0
KEY_SHARE = 4.0
VALUE_SHARE = 2.0
GATE_SHARE = 2.0
# Identity rule: the Jacobian of f at x is replaced by f(x) / (x + eps) (LXT's identity_rule_implicit).
IDENTITY_EPS = 1e-10


class _IdentityRule(Function):
    """Identity rule for an element-wise non-linearity ``y = f(x)``.

    Relevance passes through unchanged: R_x = R_y, i.e. the local Jacobian is replaced by
    ``f(x) / x`` (Eq. 10 of AttnLRP; LXT's ``identity_rule_implicit``).
    """

    @staticmethod
    def forward(ctx, fn: Callable, x: torch.Tensor, eps: float = IDENTITY_EPS):
        out = fn(x)
        ratio = out / (x + eps)
        ctx.save_for_backward(ratio)
        ctx.save_for_forward(ratio)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ratio,) = ctx.saved_tensors
        return None, ratio * grad_out, None

    @staticmethod
    def jvp(ctx, fn_t, x_t, eps_t=None):
        (ratio,) = ctx.saved_tensors
        return ratio * x_t


class _UniformRule(Function):
    """Uniform rule for an N-ary multiplication: each factor receives 1/N of the relevance.

    Applied to one operand ``x`` of the product by dividing its gradient by ``factor``
    (gate*up in the MLP: 2; q and k in attention: 4; v in attention: 2).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float):
        ctx.factor = factor
        # A clone, not a view: forward-mode AD refuses a custom Function that returns a view.
        return x.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out / ctx.factor, None

    @staticmethod
    def jvp(ctx, x_t, factor_t=None):
        return x_t / ctx.factor


def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` element-wise with the AttnLRP identity rule.

    Example:
        >>> y = identity_rule(torch.nn.functional.silu, torch.randn(3))
    """
    return _IdentityRule.apply(fn, x)


def uniform_rule(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``x`` unchanged; its gradient (and tangent) is divided by ``factor``.

    Example:
        >>> q = uniform_rule(torch.randn(2, 4), 4)
    """
    return _UniformRule.apply(x, factor)


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Treat ``x`` as a constant (zero gradient and zero tangent): AttnLRP's rule for the
    normalisation statistics (the RMSNorm variance).

    Example:
        >>> s = stop_gradient(torch.ones(1, requires_grad=True))
    """
    return x.detach()
