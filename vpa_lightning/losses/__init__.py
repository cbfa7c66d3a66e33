"""Pairwise preference losses for VLM alignment, one class per loss.

All losses share :class:`PreferenceLoss`'s interface: they take ``[B]``
sequence log-probs of the chosen/rejected responses under the policy and the
reference model and return ``(per_pair_losses, chosen_rewards, rejected_rewards)``.
"""

from .base import PreferenceLoss
from .hinge import HingeLoss
from .ipo import IPOLoss
from .mdpo import MDPOLoss
from .robust import RobustDPOLoss
from .rpo import RPOLoss
from .sigmoid import DPOLoss

__all__ = ["DPOLoss", "HingeLoss", "IPOLoss", "MDPOLoss", "PreferenceLoss", "RPOLoss", "RobustDPOLoss"]
