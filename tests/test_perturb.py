"""Compositional caption perturbations: every operation, article agreement, determinism."""

from __future__ import annotations

from hierdctl.perturb import candidates, perturb, split_chunk


def test_split_chunk():
    assert split_chunk("the large green star") == (["the"], ["large", "green"], "star")
    assert split_chunk("two dogs") == (["two"], [], "dogs")
    assert split_chunk("park") == ([], [], "park")


def test_each_operation_on_a_two_object_caption():
    got = dict((t, k) for k, t in candidates("a red circle next to a blue square", ["a red circle", "a blue square"]))
    assert got == {"a blue circle next to a red square": "swap_modifiers",
                   "a red square next to a blue circle": "swap_heads",
                   "a blue square next to a red circle": "swap_chunks"}


def test_articles_agree_and_nothing_equals_the_caption():
    cap = "a yellow circle above an orange star"
    texts = [t for _, t in candidates(cap, ["a yellow circle", "an orange star"])]
    assert "an orange circle above a yellow star" in texts  # not "a orange circle above an yellow star"
    assert cap not in texts and len(texts) == len(set(texts))
    assert candidates("a red circle next to a red circle", ["a red circle", "a red circle"]) == []
    assert candidates("there is a small cyan hexagon", ["a small cyan hexagon"]) == []  # one chunk: nothing to swap


def test_selection_is_deterministic_and_bounded():
    cap, chunks = "two dogs playing with a yellow ball in the park", ["two dogs", "a yellow ball", "the park"]
    a, b = perturb(cap, chunks, 3, seed=0), perturb(cap, chunks, 3, seed=0)
    assert a == b and len(a) == 3 and set(a) <= {t for _, t in candidates(cap, chunks)}
    assert perturb(cap, chunks, 3, seed=1) != a or len(candidates(cap, chunks)) == 3
    assert perturb(cap, chunks, 100, seed=0) == [t for _, t in candidates(cap, chunks)]
