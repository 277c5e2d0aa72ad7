"""Real-data curricula: which training samples the student sees, stage by stage (DESIGN.md section 6)."""

from dfkd.curricula.base import CURRICULA, Curriculum, Selection, easiest_per_class, window_per_class
from dfkd.curricula.methods import DCD, MEKD, SLKD, TC3KD, Uniform
from dfkd.curricula.scoring import Scorer, Scores

__all__ = [
    "CURRICULA", "Curriculum", "Selection", "Scorer", "Scores", "easiest_per_class", "window_per_class",
    "Uniform", "MEKD", "DCD", "SLKD", "TC3KD",
]
