"""The Python client (metanet_client) against the real server: every method, sync and async, the
image kinds it accepts, and the API's errors as typed exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api_tests.helpers import Server, free_port, glyph
from metanet_client import (
    APIConnectionError,
    AsyncMetaNetClient,
    ClassifyResult,
    EncodedImage,
    InvalidImage,
    InvalidInput,
    MetaNetClient,
    NotFound,
    Task,
    TaskNotFound,
)

SHAPES = ("circle", "cross", "triangle")
QUERIES = {"circle": (3, -2), "cross": (-4, 1), "triangle": (2, 3)}


@pytest.fixture(scope="module")
def metanet(server: Server) -> Iterator[MetaNetClient]:
    with MetaNetClient(server.url, timeout=120) as client:
        yield client


@pytest.fixture
def support_files(tmp_path: Path) -> dict[str, list[Path]]:
    """Two drawings per shape as PNG files, one of them saved as JPEG."""
    files: dict[str, list[Path]] = {}
    for kind in SHAPES:
        files[kind] = []
        for i, (shift, fmt) in enumerate((((0, 0), "PNG"), ((4, 4), "JPEG"))):
            path = tmp_path / f"{kind}-{i}.{fmt.lower()}"
            glyph(kind, shift=shift).save(path, fmt)
            files[kind].append(path)
    return files


def queries() -> list[object]:
    return [glyph(kind, shift=shift) for kind, shift in QUERIES.items()]


def test_a_task_goes_through_its_life_cycle(metanet: MetaNetClient, support_files: dict) -> None:
    task = metanet.create_task(support_files, name="client-life-cycle")
    assert isinstance(task, Task)
    assert (task.name, task.labels, task.n_way, task.n_examples) == ("client-life-cycle", SHAPES, 3, 6)
    assert task.shots == {kind: 2 for kind in SHAPES}
    assert task.model_version == metanet.model_info().version
    assert metanet.get_task(task.task_id) == task
    every = [t.task_id for t in metanet.iter_tasks(page_size=2)]
    assert task.task_id in every
    paged, cursor = [], None
    while True:  # list_tasks: one page at a time, as iter_tasks walks them
        page = metanet.list_tasks(limit=1, cursor=cursor)
        paged += [t.task_id for t in page.data]
        if (cursor := page.next_cursor) is None:
            break
    assert paged == every

    # A new label with two shots, as every other label has.
    more = [("bar", glyph("bar")), ("bar", glyph("bar", shift=(4, 4)))]
    grown = metanet.add_examples(task.task_id, more)
    assert grown.labels == (*SHAPES, "bar") and grown.n_examples == 8 and grown.shots["bar"] == 2

    images = [*queries(), glyph("bar", shift=(3, 2))]
    result = metanet.classify(task.task_id, images, top_k=2, explain=True)
    assert isinstance(result, ClassifyResult) and result.task_id == task.task_id
    assert result.labels == [*QUERIES, "bar"]
    for prediction in result:
        assert prediction.confidence == prediction.top_k[0].probability and len(prediction.top_k) == 2
        assert prediction.attention is not None and len(prediction.attention) == grown.n_examples
        assert sum(a.weight for a in prediction.attention) == pytest.approx(1.0, abs=1e-4)

    metanet.delete_task(task.task_id)
    with pytest.raises(TaskNotFound) as caught:
        metanet.get_task(task.task_id)
    assert (caught.value.status, caught.value.type) == (404, "task_not_found")
    assert task.task_id in caught.value.message


def test_files_pil_images_and_arrays_of_one_drawing_classify_alike(metanet: MetaNetClient,
                                                                     tmp_path: Path) -> None:
    task = metanet.create_task({kind: [glyph(kind)] for kind in SHAPES})
    drawing = glyph("cross", shift=(-4, 1))
    drawing.save(tmp_path / "q.png")
    grey = np.asarray(drawing)
    as_kinds = [tmp_path / "q.png", str(tmp_path / "q.png"), (tmp_path / "q.png").read_bytes(), drawing,
                grey, grey / 255.0, grey.tolist()]
    result = metanet.classify(task.task_id, as_kinds, top_k=3)
    assert set(result.labels) == {"cross"}
    probabilities = [[p.probability for p in sorted(pred.top_k, key=lambda p: p.label)] for pred in result]
    np.testing.assert_allclose(probabilities, [probabilities[0]] * len(as_kinds), atol=1e-5)
    one = metanet.classify(task.task_id, drawing)  # a lone image is a batch of one
    assert one.labels == ["cross"]


def test_classify_once_agrees_with_a_registered_task(metanet: MetaNetClient) -> None:
    support = [(kind, glyph(kind)) for kind in SHAPES]
    registered = metanet.classify(metanet.create_task(support).task_id, queries(), top_k=3)
    once = metanet.classify_once(support, queries(), top_k=3)
    assert once.task_id is None and once.labels == registered.labels == list(QUERIES)
    for a, b in zip(once, registered, strict=True):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_warnings_min_confidence_and_support_similarity_reach_the_client(metanet: MetaNetClient) -> None:
    circle = glyph("circle")
    task = metanet.create_task([("circle", circle), ("ring", circle), ("cross", glyph("cross"))])
    assert {w.type for w in task.warnings} == {"misclassified_example", "indistinguishable_examples"}
    pair = next(w for w in task.warnings if w.type == "indistinguishable_examples")
    assert pair.details["example_indices"] == [0, 1] and pair.details["labels"] == ["circle", "ring"]
    assert metanet.get_task(task.task_id).warnings == task.warnings
    clean = metanet.create_task({kind: [glyph(kind)] for kind in SHAPES})
    assert clean.warnings == ()

    plain = metanet.classify(task.task_id, [circle, glyph("cross")])
    assert plain[0].confidence < 1 and plain[0].label is not None  # "circle" or "ring", unsure
    assert plain[0].support_similarity == pytest.approx(1.0, abs=1e-4)
    unsure = metanet.classify(task.task_id, [circle, glyph("cross")], min_confidence=1.0)
    assert unsure[0].label is None and unsure[0].confidence == plain[0].confidence
    once = metanet.classify_once([("circle", circle), ("ring", circle)], [circle], min_confidence=1.0)
    assert once.labels == [None] and once[0].support_similarity is not None


def test_unknown_tasks_raise_task_not_found_for_every_method(metanet: MetaNetClient) -> None:
    calls = [
        lambda: metanet.get_task("no-such-task"),
        lambda: metanet.delete_task("no-such-task"),
        lambda: metanet.classify("no-such-task", queries()),
        lambda: metanet.add_examples("no-such-task", [("a", glyph("bar"))]),
    ]
    for call in calls:
        with pytest.raises(TaskNotFound, match="no-such-task") as caught:
            call()
        assert isinstance(caught.value, NotFound) and caught.value.type == "task_not_found"


def test_a_bad_image_raises_invalid_image_locating_it(metanet: MetaNetClient) -> None:
    task = metanet.create_task({kind: [glyph(kind)] for kind in SHAPES})
    with pytest.raises(InvalidImage) as caught:
        metanet.classify(task.task_id, [glyph("circle"), EncodedImage("bm90IGFuIGltYWdl")])
    error = caught.value
    assert isinstance(error, InvalidInput)
    assert (error.status, error.type) == (422, "invalid_image")
    assert "images[1]" in error.message and error.details["index"] == 1
    with pytest.raises(InvalidImage, match="0..255"):
        metanet.classify(task.task_id, [[[0, 300], [255, 0]]])


def test_invalid_content_raises_invalid_input(metanet: MetaNetClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        metanet.create_task([("only", glyph("circle")), ("only", glyph("cross"))])
    assert caught.value.type == "invalid_input" and caught.value.status == 422
    with pytest.raises(InvalidInput, match="top_k"):
        metanet.classify_once([(k, glyph(k)) for k in SHAPES], queries(), top_k=0)


def test_model_info_and_probes(metanet: MetaNetClient) -> None:
    info = metanet.model_info()
    assert info.max_way >= 3 and info.image_size == 28 and info.device == "cpu"
    assert metanet.health() is True and metanet.ready() is True


def test_the_async_client_does_the_same(server: Server, support_files: dict) -> None:
    async def scenario() -> None:
        async with AsyncMetaNetClient(server.url, timeout=120) as client:
            task = await client.create_task(support_files, name="async")
            assert task.labels == SHAPES and (await client.get_task(task.task_id)) == task
            assert task.task_id in [t.task_id async for t in client.iter_tasks(page_size=3)]
            results = await asyncio.gather(*(client.classify(task.task_id, queries()) for _ in range(3)))
            assert [r.labels for r in results] == [list(QUERIES)] * 3
            grown = await client.add_examples(task.task_id, {"bar": [glyph("bar")]})
            assert grown.n_way == 4
            once = await client.classify_once([(k, glyph(k)) for k in SHAPES], queries())
            assert once.labels == list(QUERIES)
            picky = await client.classify(task.task_id, queries(), min_confidence=1.0)
            assert all((p.label is None) == (p.confidence < 1) for p in picky)
            assert all(p.support_similarity is not None for p in picky)
            assert (await client.model_info()).version == task.model_version
            assert await client.ready()
            await client.delete_task(task.task_id)
            with pytest.raises(TaskNotFound, match=task.task_id):
                await client.classify(task.task_id, queries())
            with pytest.raises(InvalidImage):
                await client.classify_once([(k, glyph(k)) for k in SHAPES], [EncodedImage("AAAA")])

    asyncio.run(scenario())


def test_a_service_that_is_not_there_raises_api_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with MetaNetClient(url, timeout=5) as client, pytest.raises(APIConnectionError, match="cannot reach"):
        client.list_tasks()
    with pytest.raises(APIConnectionError):
        asyncio.run(_async_health(url))


async def _async_health(url: str) -> bool:
    async with AsyncMetaNetClient(url, timeout=5) as client:
        return await client.health()
