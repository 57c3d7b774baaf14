"""The anatomy gym: drawn human figures whose anatomy is checked exactly from pixels.

* :mod:`~armature.gym.figures`: poses inside anatomical limits, the renderer and its ground truth;
* :mod:`~armature.gym.oracle`: the anatomy oracle (counts, attachments, joints, proportions →
  defects and a severity 0-3);
* :mod:`~armature.gym.defects`: defect injectors and preference pairs in the platform's format.

numpy, scipy and PIL only: no Ray, no torch.
"""

from armature.gym.defects import KINDS, agreement, inject, make_pair, pairs, sample_defective
from armature.gym.figures import Figure, render, sample_figure
from armature.gym.oracle import AnatomyOracle, Verdict

__all__ = [
    "KINDS",
    "AnatomyOracle",
    "Figure",
    "Verdict",
    "agreement",
    "inject",
    "make_pair",
    "pairs",
    "render",
    "sample_defective",
    "sample_figure",
]
