"""A server with API keys: the client and the CLI send theirs as a Bearer token, and a missing or
wrong key surfaces as the API's `unauthorized` error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api_tests.helpers import Server, glyph
from api_tests.test_cli import failed, ok, run_cli
from metanet_client import MetaNetClient, TaskNotFound, Unauthorized

ALICE, BOB = "alice-client-key", "bob-client-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("client-keys") / "data", api_keys=f"{ALICE},{BOB}",
                    torch_threads=1)
    try:
        yield server.start()
    finally:
        server.stop()


def test_the_client_sends_its_key_and_sees_only_its_tasks(keyed_server: Server) -> None:
    with MetaNetClient(keyed_server.url, ALICE) as alice, MetaNetClient(keyed_server.url, BOB) as bob:
        task = alice.create_task({"circle": [glyph("circle")], "cross": [glyph("cross")]})
        assert [t.task_id for t in alice.iter_tasks()] == [task.task_id]
        assert list(bob.iter_tasks()) == []
        with pytest.raises(TaskNotFound):
            bob.get_task(task.task_id)


@pytest.mark.parametrize("key", [None, "not-a-key"])
def test_a_missing_or_wrong_key_raises_unauthorized(keyed_server: Server, key: str | None) -> None:
    with MetaNetClient(keyed_server.url, key) as client:
        with pytest.raises(Unauthorized) as caught:
            client.list_tasks()
        assert (caught.value.status, caught.value.type) == (401, "unauthorized")
        assert "Bearer" in caught.value.message
        assert client.ready() is True  # the probes need no key


def test_the_cli_takes_its_key_from_the_environment_or_the_option(keyed_server: Server) -> None:
    with MetaNetClient(keyed_server.url, BOB) as bob:
        task_id = bob.create_task({"circle": [glyph("circle")], "bar": [glyph("bar")]}).task_id
    assert task_id in ok(run_cli(keyed_server.url, "tasks", "ls", env={"METANET_API_KEY": BOB}))
    assert task_id in ok(run_cli(keyed_server.url, "tasks", "get", task_id, "--api-key", BOB))
    failed(run_cli(keyed_server.url, "tasks", "ls"), 1, "metanet tasks ls: error: unauthorized: ")
    failed(run_cli(keyed_server.url, "tasks", "get", task_id, "--api-key", ALICE), 1, "task_not_found")
