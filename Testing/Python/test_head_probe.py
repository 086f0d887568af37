"""The head probe scores each class of one head on synthetic crops and names the classes a head
never outputs (what the training loss hides)."""
from types import SimpleNamespace

import pytest
import torch

from msdseg.evaluation.diagnostics.head_probe import probe_head
from shared import TREE
from test_training import _generator

pytestmark = pytest.mark.unit

NAMES = ["background"] + [leaf.id for leaf in TREE.leaves]  # channel order


class _Echo(torch.nn.Module):
    """Returns x_t as logits: at t = 0, x_t is the true labels, so the answer is perfect."""

    cfg = SimpleNamespace(depth_of=lambda mm: 0)

    def forward(self, image, x_t, t, entry=0, coords=None):
        return [x_t]


class _Silent(_Echo):
    """Says background everywhere: a head that has given up on every structure."""

    def forward(self, image, x_t, t, entry=0, coords=None):
        out = torch.zeros_like(x_t)
        out[:, 0] = 1.0
        return [out]


def test_a_perfect_head_scores_one_and_a_silent_head_is_named():
    perfect = probe_head(_Echo(), _generator(), NAMES, 2.0, crops=2, t=0, seed=0, crop=24).summary()
    present = [n for n, d in perfect["dice"].items() if d is not None]
    assert present and set(present) <= {"left_cerebral_cortex", "right_cerebral_cortex"}
    # (partial-volume voxels of the soft reference may tip either way under t = 0's tiny noise)
    assert all(perfect["dice"][n] > 0.97 for n in present) and perfect["never_predicted"] == []
    assert perfect["crops"] == 2 and perfect["mean_dice_present"] > 0.97

    silent = probe_head(_Silent(), _generator(), NAMES, 2.0, crops=2, t=0, seed=0, crop=24).summary()
    assert sorted(silent["never_predicted"]) == sorted(present)
    assert silent["mean_dice_present"] == 0.0


def test_the_deterministic_timestep_feeds_zeros():
    """t = T - 1 is the deterministic pass: x_t = 0, so the echo head has nothing to copy."""
    seen = []

    class Spy(_Echo):
        def forward(self, image, x_t, t, entry=0, coords=None):
            seen.append((float(x_t.abs().max()), int(t[0])))
            return super().forward(image, x_t, t, entry, coords)

    probe_head(Spy(), _generator(), NAMES, 2.0, crops=1, t=999, seed=0, crop=24)
    assert seen == [(0.0, 999)]
