"""Preference losses for VLM alignment, one class per loss, picked in YAML by ``class_path``.

Pairwise losses (:class:`PairwiseLoss`: per-pair weighting, margin-scaled beta and LD-DPO are
options of the base class) take ``[B]`` sequence log-probs of the chosen/rejected responses under
the policy and the reference and return ``(per_pair_losses, chosen_rewards, rejected_rewards)``.
Every loss also has :meth:`PreferenceLoss.batch_loss` on a :class:`LossBatch` (all responses of
all groups), which the trainer calls; listwise losses and KTO work there only.
"""

from .apo import APODownLoss, APOZeroLoss
from .base import LossBatch, LossOutput, PairwiseLoss, PreferenceLoss
from .bco import BCOPairLoss
from .combined import CombinedLoss
from .exo import EXOLoss
from .hinge import HingeLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .listwise import LiPOLambdaLoss, PlackettLuceLoss
from .mdpo import MDPOLoss
from .nca import NCALoss
from .orpo import ORPOLoss
from .robust import RobustDPOLoss
from .rpo import RPOLoss
from .sft import SFTLoss
from .sigmoid import DPOLoss
from .simpo import SimPOLoss
from .sppo import SPPOHardLoss

__all__ = [
    "APODownLoss",
    "APOZeroLoss",
    "BCOPairLoss",
    "CombinedLoss",
    "DPOLoss",
    "EXOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LiPOLambdaLoss",
    "LossBatch",
    "LossOutput",
    "MDPOLoss",
    "NCALoss",
    "ORPOLoss",
    "PairwiseLoss",
    "PlackettLuceLoss",
    "PreferenceLoss",
    "RPOLoss",
    "RobustDPOLoss",
    "SFTLoss",
    "SPPOHardLoss",
    "SimPOLoss",
]
