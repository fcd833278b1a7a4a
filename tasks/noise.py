"""Label noise for the robustness experiment (--label-noise): the paper trains with a fraction of
the training labels flipped to test whether label smoothing makes the head robust to them."""
from __future__ import annotations

import random

from .types import ChoiceExample, PreferenceExample


def apply_label_noise(examples: list, fraction: float, seed: int) -> list:
    """Flip exactly round(fraction * n) training labels: a choice example gets a uniformly drawn
    wrong label, a preference example has chosen and rejected swapped. Other kinds pass."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--label-noise must be in [0, 1], got {fraction}")
    flippable = [i for i, ex in enumerate(examples)
                 if isinstance(ex, PreferenceExample)
                 or (isinstance(ex, ChoiceExample) and len(ex.candidates) > 1)]
    rng = random.Random(seed)
    flip = set(rng.sample(flippable, round(fraction * len(flippable))))
    out = []
    for i, ex in enumerate(examples):
        if i in flip and isinstance(ex, ChoiceExample):
            wrong = [j for j in range(len(ex.candidates)) if j != ex.label]
            ex = ChoiceExample(ex.task, ex.messages, ex.candidates, rng.choice(wrong), ex.value)
        elif i in flip:
            ex = PreferenceExample(ex.task, ex.messages, ex.rejected, ex.chosen)
        out.append(ex)
    return out
