"""White-box tests of model/metanet.py: the memories register builds, how classify reads them, and the
guards that refuse bad tasks. A tiny MetaNet (8 channels, max_way 6, max_examples 12) after a fixed seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from model import InvalidTaskError, MetaNet, TaskMemory
from model.metanet import _QUERY_BLOCK, chunk_means, content_chunks
from tests.model.conftest import glyphs

# P, the floats per row of M for the tiny config: b's convs 8*1*9 + 4 * 8*8*9, FC 8*8, softmax 6*8.
TINY_P = 72 + 4 * 576 + 64 + 48


# --------------------------------------------------------------------------------- memories


def test_register_builds_memories_of_the_documented_shapes(model, support):
    images, labels = support
    memory = model.register(images, labels)
    assert memory.labels == ("alpha", "beta", "gamma")
    assert (memory.n_way, memory.n_support) == (3, 6)
    assert memory.support_labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert [q.shape for q in memory.Q_fast] == [p.shape for p in model.u_path_params()]
    assert memory.R.shape == (6, model.config.rep_dim)
    assert model.n_fast_b == sum(p.numel() for p in model.b_params()) == TINY_P
    assert memory.M.shape == (6, TINY_P)


def test_register_returns_constants_that_track_no_gradient(model, support):
    memory = model.register(*support)
    assert not any(t.requires_grad for t in (memory.R, memory.M, *memory.Q_fast))


def test_nbytes_counts_every_memory_tensor(model, support):
    memory = model.register(*support)
    tensors = [memory.support_labels, memory.R, memory.M, *memory.Q_fast]
    assert memory.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    q_floats = sum(p.numel() for p in model.u_path_params())
    assert memory.nbytes == 4 * (q_floats + 6 * 8 + 6 * TINY_P) + 8 * 6  # float32 memories, int64 labels


def test_memory_to_moves_every_tensor_and_keeps_labels(model, support, queries):
    memory = model.register(*support)
    on_meta = memory.to("meta")
    assert on_meta.labels == memory.labels
    assert all(
        t.device.type == "meta" for t in (on_meta.support_labels, on_meta.R, on_meta.M, *on_meta.Q_fast)
    )
    back = memory.to("cpu")
    assert back.device == torch.device("cpu")
    torch.testing.assert_close(model.classify(back, queries).probs, model.classify(memory, queries).probs)


def test_with_m_dtype_float16_halves_the_bytes_of_M_and_still_classifies(model, support, queries):
    memory = model.register(*support)
    half = memory.with_m_dtype(torch.float16)
    assert half.M.dtype == torch.float16
    assert half.M.numel() * half.M.element_size() * 2 == memory.M.numel() * memory.M.element_size()
    assert memory.nbytes - half.nbytes == memory.M.numel() * 2
    assert memory.M.dtype == torch.float32  # the original is untouched (immutable value)
    torch.testing.assert_close(
        model.classify(half, queries).probs, model.classify(memory, queries).probs, rtol=0, atol=1e-3
    )


def test_task_memory_is_immutable(model, support):
    memory = model.register(*support)
    with pytest.raises(dataclasses.FrozenInstanceError):
        memory.M = torch.zeros(1)  # type: ignore[misc]


# ------------------------------------------------------------------------ fast weights matter


def test_zeroing_the_fast_weights_M_changes_the_prediction(model, support, queries):
    memory = model.register(*support)
    no_w_fast = dataclasses.replace(memory, M=torch.zeros_like(memory.M))
    before, after = model.classify(memory, queries).probs, model.classify(no_w_fast, queries).probs
    assert (before - after).abs().max() > 1e-3


def test_zeroing_the_fast_weights_Q_fast_changes_attention_and_prediction(model, support, queries):
    memory = model.register(*support)
    no_q_fast = dataclasses.replace(memory, Q_fast=tuple(torch.zeros_like(q) for q in memory.Q_fast))
    before = model.classify(memory, queries, return_attention=True)
    after = model.classify(no_q_fast, queries, return_attention=True)
    # Q* shapes r and R, hence the attention over M; at initialisation the rows of M are alike, so
    # the change in probabilities is small but must be there.
    assert (before.attention - after.attention).abs().max() > 1e-5
    assert not torch.equal(before.probs, after.probs)


# Untrained tiny MetaNet after torch.manual_seed(0), support glyphs(6, seed=1), queries glyphs(4, seed=2)
# (torch 2.13, CPU). A change here means the architecture, initialisation or fixtures changed.
GOLDEN_PROBS = [
    [0.076457, 0.859545, 0.063998],
    [0.054871, 0.897334, 0.047796],
    [0.093543, 0.838185, 0.068272],
    [0.061590, 0.861420, 0.076990],
]


def test_classify_matches_golden_probabilities_after_a_fixed_seed(model, support, queries):
    probs = model.classify(model.register(*support), queries).probs
    torch.testing.assert_close(probs, torch.tensor(GOLDEN_PROBS), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ classify


def test_classify_probabilities_have_shape_n_query_by_n_way_and_sum_to_one(model, support, queries):
    out = model.classify(model.register(*support), queries)
    assert out.probs.shape == (4, 3)
    assert out.attention is None
    assert (out.probs >= 0).all()
    torch.testing.assert_close(out.probs.sum(1), torch.ones(4))


def test_attention_has_shape_n_query_by_n_support_and_rows_sum_to_one(model, support, queries):
    out = model.classify(model.register(*support), queries, return_attention=True)
    assert out.attention.shape == (4, 6)
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(1), torch.ones(4))


def test_classify_accepts_images_without_the_channel_axis(model, support, queries):
    memory = model.register(*support)
    torch.testing.assert_close(
        model.classify(memory, queries[:, 0]).probs, model.classify(memory, queries).probs
    )


def test_each_query_is_classified_independently_of_its_batch(model, support):
    memory = model.register(*support)
    many = glyphs(_QUERY_BLOCK + 6, seed=5)  # more than one block of queries
    batched = model.classify(memory, many, return_attention=True)
    assert batched.probs.shape == (_QUERY_BLOCK + 6, 3)
    for i in (0, _QUERY_BLOCK - 1, _QUERY_BLOCK + 5):
        alone = model.classify(memory, many[i : i + 1], return_attention=True)
        torch.testing.assert_close(alone.probs[0], batched.probs[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(alone.attention[0], batched.attention[i], rtol=0, atol=1e-6)


def test_unbalanced_support_sets_register_and_classify(model, queries):
    labels = ["a", "a", "a", "b", "c", "c"]  # 3, 1 and 2 shots
    memory = model.register(glyphs(6, seed=7), labels)
    assert memory.support_labels.tolist() == [0, 0, 0, 1, 2, 2]
    out = model.classify(memory, queries, return_attention=True)
    assert out.probs.shape == (4, 3) and out.attention.shape == (4, 6)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(4))


@pytest.mark.parametrize("n_way", range(2, 7))
def test_every_n_way_from_two_up_to_max_way_works(model, queries, n_way):
    labels = [f"class-{k}" for k in range(n_way)] * 2
    memory = model.register(glyphs(2 * n_way, seed=n_way), labels)
    probs = model.classify(memory, queries).probs
    assert probs.shape == (4, n_way)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_classes_at_or_beyond_n_way_get_no_probability(model, support, queries):
    memory = model.register(*support)
    with torch.inference_mode():  # memories are inference tensors, as in classify
        logits, _ = model._read(queries, memory.Q_fast, memory.R, memory.M, memory.attention_bias,
                                memory.n_way)
        slow_only = model.b(queries, None, 2)
    assert logits.shape == (4, model.config.max_way)
    assert torch.isneginf(logits[:, 3:]).all() and torch.isfinite(logits[:, :3]).all()
    assert (torch.softmax(logits, dim=1)[:, 3:] == 0).all()
    assert torch.isneginf(slow_only[:, 2:]).all() and torch.isfinite(slow_only[:, :2]).all()


def test_labels_are_numbered_in_order_of_first_appearance(model):
    memory = model.register(glyphs(4, seed=8), ["zeta", "alpha", "zeta", "alpha"])
    assert memory.labels == ("zeta", "alpha")
    assert memory.support_labels.tolist() == [0, 1, 0, 1]


# ---------------------------------------------------------------------------- determinism


def test_register_is_deterministic_for_the_same_support_set(model, support, queries):
    first, second = model.register(*support), model.register(*support)
    for a, b in zip(
        (first.support_labels, first.R, first.M, *first.Q_fast),
        (second.support_labels, second.R, second.M, *second.Q_fast),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert torch.equal(model.classify(first, queries).probs, model.classify(second, queries).probs)


def test_register_gives_the_same_memory_with_or_without_the_channel_axis(model, support):
    images, labels = support
    assert torch.equal(model.register(images[:, 0], labels).M, model.register(images, labels).M)


def test_content_chunks_cover_the_support_set_once_and_follow_its_content():
    images, y = glyphs(7, seed=9), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    chunks = content_chunks(images, y, n_chunks=5)
    assert len(chunks) == 5
    assert sorted(torch.cat(chunks).tolist()) == list(range(7))
    again = content_chunks(images.clone(), y.clone(), n_chunks=5)
    assert all(torch.equal(a, b) for a, b in zip(chunks, again, strict=True))
    assert len(content_chunks(images[:3], y[:3], n_chunks=5)) == 3  # never an empty chunk


# --------------------------------------------------------------------------------- guards


def _register_error(model: MetaNet, images, labels) -> InvalidTaskError:
    with pytest.raises(InvalidTaskError) as info:
        model.register(images, labels)
    return info.value


def test_register_refuses_an_empty_support_set(model):
    err = _register_error(model, torch.empty(0, 1, 28, 28), [])
    assert err.field == "images" and "empty" in str(err) and err.index is None


def test_register_refuses_a_single_class(model):
    err = _register_error(model, glyphs(3, seed=0), ["a", "a", "a"])
    assert err.field == "labels" and "at least 2 distinct labels" in str(err)


def test_register_refuses_more_than_max_way_classes(model):
    err = _register_error(model, glyphs(7, seed=0), list("abcdefg"))
    assert err.field == "labels" and "max_way=6" in str(err) and "got 7" in str(err)


def test_register_refuses_more_than_max_examples(model):
    err = _register_error(model, glyphs(13, seed=0), ["a", "b"] * 6 + ["a"])
    assert err.field == "images" and "13 examples" in str(err) and "max_examples=12" in str(err)


def test_register_refuses_labels_and_images_of_different_lengths(model):
    err = _register_error(model, glyphs(4, seed=0), ["a", "b", "a"])
    assert err.field == "labels" and "3 labels for 4 images" in str(err)


@pytest.mark.parametrize("shape", [(4, 1, 32, 32), (4, 3, 28, 28), (28, 28), (4, 1, 1, 28, 28)])
def test_register_refuses_images_of_the_wrong_shape(model, shape):
    err = _register_error(model, torch.zeros(shape), ["a", "b"] * 2)
    assert err.field == "images" and "(n, 1, 28, 28)" in str(err) and str(tuple(shape)) in str(err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 255.0, -0.5])
def test_register_refuses_pixels_that_are_not_finite_or_outside_0_1_and_names_the_image(model, bad):
    images = glyphs(4, seed=0)
    images[2, 0, 5, 5] = bad
    err = _register_error(model, images, ["a", "b"] * 2)
    assert err.field == "images" and err.index == 2 and "images[2]" in str(err) and "NaN" in str(err)


def test_register_refuses_an_empty_string_label_and_names_it(model):
    err = _register_error(model, glyphs(4, seed=0), ["a", "", "b", "a"])
    assert err.field == "labels" and err.index == 1 and "labels[1] must be a non-empty string" in str(err)


def test_register_refuses_a_label_that_is_not_a_string(model):
    err = _register_error(model, glyphs(4, seed=0), ["a", "b", 3, "a"])
    assert err.field == "labels" and err.index == 2


@pytest.mark.parametrize("labels", ["abab", None, {"a", "b"}])
def test_register_refuses_labels_that_are_not_a_sequence_of_strings(model, labels):
    err = _register_error(model, glyphs(4, seed=0), labels)
    assert err.field == "labels" and "sequence of strings" in str(err)


@pytest.mark.parametrize(
    "images", [np.zeros((4, 1, 28, 28), np.float32), [[0.0] * 28] * 28, None], ids=["ndarray", "list", "None"]
)
def test_register_refuses_images_that_are_not_a_tensor(model, images):
    err = _register_error(model, images, ["a", "b"] * 2)
    assert err.field == "images" and "must be a tensor" in str(err) and type(images).__name__ in str(err)


def test_register_refuses_integer_images(model):
    err = _register_error(model, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), ["a", "b"] * 2)
    assert err.field == "images" and "floating point" in str(err)


def test_invalid_task_error_is_a_value_error_with_its_message(model):
    err = _register_error(model, glyphs(2, seed=0), ["a", "a"])
    assert isinstance(err, ValueError) and err.message == str(err)


@pytest.mark.parametrize(
    ("images", "needle", "index"),
    [
        (torch.empty(0, 1, 28, 28), "empty", None),
        (torch.zeros(2, 1, 27, 27), "(n, 1, 28, 28)", None),
        (np.zeros((2, 1, 28, 28), np.float32), "must be a tensor", None),
        (torch.tensor([0.0, float("nan")]).repeat_interleave(784).reshape(2, 1, 28, 28), "images[1]", 1),
    ],
    ids=["empty", "shape", "ndarray", "nan"],
)
def test_classify_refuses_bad_queries_with_a_clear_error(model, support, images, needle, index):
    memory = model.register(*support)
    with pytest.raises(InvalidTaskError) as info:
        model.classify(memory, images)
    assert info.value.field == "images" and needle in str(info.value) and info.value.index == index


def test_classify_takes_more_queries_than_max_examples(model, support):
    # max_examples bounds the support set (M), not the query batch.
    assert model.classify(model.register(*support), glyphs(13, seed=0)).probs.shape == (13, 3)


def test_a_task_memory_is_a_plain_value_that_names_its_parts():
    assert {f.name for f in dataclasses.fields(TaskMemory)} == {
        "labels",
        "support_labels",
        "Q_fast",
        "R",
        "M",
    }


def test_classify_many_answers_each_request_as_classify_does_alone(model, support, queries) -> None:
    """Requests of two tasks, interleaved (A, B, A, A): attention and softmax run per task over
    the rows of all its requests; each request still gets what `classify` gives it alone."""
    images, labels = support
    other = model.register(images.flip(-1), labels)
    memory = model.register(images, labels)
    parts = [(memory, queries[:2]), (other, queries[2:3]), (memory, queries[3:4]), (memory, queries[1:4])]
    together = model.classify_many(parts, return_attention=True)
    for (task, x), got in zip(parts, together, strict=True):
        alone = model.classify(task, x, return_attention=True)
        torch.testing.assert_close(got.probs, alone.probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.attention, alone.attention, atol=1e-6, rtol=0)
    assert model.classify_many(parts)[1].attention is None


def test_classify_many_names_the_bad_image_within_its_own_request(model, support, queries) -> None:
    memory = model.register(*support)
    bad = queries[:3].clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(InvalidTaskError, match=r"images\[2\] has pixels") as caught:
        model.classify_many([(memory, queries[:2]), (memory, bad)])
    assert caught.value.index == 2


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5, math.nan, math.inf, -math.inf, -0.5, 1.5, 255.0])
def test_the_batch_pixel_check_agrees_with_the_per_image_one(value):
    # classify_many checks a whole batch with one min/max reduction and names the culprit with
    # _bad_pixels only when it fails: both must refuse exactly the same batches.
    from model.metanet import _bad_pixels, _pixels_in_range

    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images[2, 0, 3, 5] = value
    assert _pixels_in_range(images) == (not bool(_bad_pixels(images).any()))
    assert _pixels_in_range(images[:0])


# ----------------------------------------------------------------- uneven support sets, calibration


def _repeated(memory: TaskMemory, row: int, times: int) -> TaskMemory:
    """The memory with support example `row` stored `times` more times (same R and M rows)."""
    keep = torch.cat([torch.arange(memory.n_support), torch.full((times,), row)])
    return TaskMemory(memory.labels, memory.support_labels[keep], memory.Q_fast, memory.R[keep],
                      memory.M[keep])


def test_a_class_with_more_examples_does_not_gain_weight_from_their_number(model, queries):
    """Repeating a class's example k times reads M exactly as storing it once: each example is
    weighed by 1 / its class's size, so a class's share of the read is its similarity, not its count."""
    memory = model.register(glyphs(3, seed=5), ["a", "b", "c"])
    heavy = _repeated(memory, row=0, times=4)
    assert heavy.attention_bias.tolist() == pytest.approx([-math.log(5), 0, 0] + [-math.log(5)] * 4)
    torch.testing.assert_close(model.classify(heavy, queries).probs, model.classify(memory, queries).probs)
    attention = model.classify(heavy, queries, return_attention=True).attention
    torch.testing.assert_close(attention[:, [0, 3, 4, 5, 6]].sum(1),
                               model.classify(memory, queries, return_attention=True).attention[:, 0])


def test_even_classes_read_m_by_the_plain_softmax_of_the_cosines(model, support, queries):
    memory = model.register(*support)
    assert torch.all(memory.attention_bias == memory.attention_bias[0])
    out = model.classify(memory, queries, return_attention=True)
    with torch.inference_mode():
        r = model.u(queries, memory.Q_fast)
        cosine = torch.nn.functional.normalize(r, dim=1) @ torch.nn.functional.normalize(memory.R, dim=1).T
    torch.testing.assert_close(out.attention, torch.softmax(cosine, dim=1))
    torch.testing.assert_close(out.similarity, cosine.amax(dim=1))


def test_probabilities_are_the_softmax_of_the_logits_over_the_temperature_of_their_class_count(
    model, support, queries
):
    memory = model.register(*support)
    with torch.inference_mode():
        logits, _ = model._read(queries, memory.Q_fast, memory.R, memory.M, memory.attention_bias,
                                memory.n_way)
    model.temperature.copy_(torch.arange(model.config.max_way + 1) + 0.5)  # 3 classes: 3.5
    probs = model.classify(memory, queries).probs
    torch.testing.assert_close(probs, torch.softmax(logits[:, :3] / 3.5, dim=1))


def test_a_support_image_as_its_own_query_has_similarity_one(model, support):
    images, labels = support
    memory = model.register(images, labels)
    similarity = model.classify(memory, images).similarity
    torch.testing.assert_close(similarity, torch.ones(len(images)), atol=1e-5, rtol=0)


def test_check_support_names_examples_of_different_labels_the_model_cannot_tell_apart(model):
    images = glyphs(3, seed=6)
    twins = torch.cat([images, images[:1]])  # example 3 is example 0 under another label
    memory = model.register(twins, ["a", "b", "c", "d"])
    check = model.check_support(memory, twins)
    assert [(i, j) for i, j, _ in check.confusable] == [(0, 3)]
    assert check.confusable[0][2] == pytest.approx(1.0, abs=1e-5)
    assert check.predicted.shape == check.confidence.shape == (4,)


def test_chunk_means_weigh_each_class_as_one_example_and_are_plain_means_for_even_classes():
    member = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    uneven = chunk_means(member, torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(uneven, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 1 / 2], [0.5, 0.5, 0.0, 0.0]]))
    even = chunk_means(member, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(even, member / member.sum(1, keepdim=True))
    batched = chunk_means(torch.stack([member, member]), torch.tensor([[0, 0, 0, 1], [0, 1, 0, 1]]))
    torch.testing.assert_close(batched, torch.stack([uneven, even]))
