"""IPO loss."""

from __future__ import annotations

from torch import Tensor

from .base import PairwiseLoss

__all__ = ["IPOLoss"]


class IPOLoss(PairwiseLoss):
    r"""Identity Preference Optimisation (IPO).

    Azar et al., "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036. A squared loss that regresses the
    log-ratio margin to :math:`1/(2\tau)` instead of pushing it to infinity:

    .. math::

        \mathcal{L} = \left(h - \frac{1}{2\beta}\right)^2,\qquad
        h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]

    where ``beta`` plays the role of the paper's regulariser :math:`\tau`.
    The log-probs are **length-averaged** by default (``average_logps`` true: the module
    feeds ``sum_logps / n_tokens``), as in the paper's experiments and TRL's ``ipo`` (which
    divides the summed log-ratios by the completion length, confirmed with the authors);
    with summed log-probs the target margin ``1/(2 beta)`` would not be length-invariant.
    ``average_logps: false`` restores summed log-probs. :meth:`forward` takes the values as
    given (average them yourself).

    Args:
        beta: Regularisation strength :math:`\tau` (> 0); the target margin is ``1 / (2 beta)``.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    default_average_logps = True

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
