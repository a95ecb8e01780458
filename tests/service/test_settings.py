"""Settings refuse nonsense by name, from the environment as from code."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.inference.batcher import RETRY_AFTER_MAX_S
from service.settings import Settings

BAD = [
    ("heap_trim_idle_s", "-1"), ("heap_trim_idle_s", "soon"), ("batch_max_images", "-1"),
    ("batch_max_wait_ms", "-5"), ("batch_linger_ms", "-1"), ("batch_linger_ms", "5000"),
    ("batch_linger_ms", "soon"), ("max_pending", "0"), ("max_queue_images", "-1"),
    ("max_queue_wait_ms", "-1"), ("max_queue_wait_factor", "nan"),
    ("request_timeout_s", "0"), ("gil_switch_interval_ms", "1000"), ("m_dtype", "float8"),
    ("backend", "tensorrt"), ("device", "tpu"), ("cache_bytes", "lots"),
    ("one_thread_below_images", "-1"), ("one_thread_below_images", "few"), ("query_decode", "gpu"),
    ("decode_processes", "-1"), ("decode_processes", "many"), ("heap_retain_mb", "-1"),
    ("heap_retain_mb", "lots"),
    ("model_workers", "-1"), ("model_workers", "two"),
    ("processes", "-1"), ("processes", "lots"), ("processes", "65"),
    ("overload_demand", "-1"), ("overload_demand", "many"), ("overload_forward_factor", "0.5"),
    ("overload_forward_factor", "-1"), ("overload_forward_factor", "inf"), ("keep_alive_s", "0"),
    ("keep_alive_s", "forever"),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_a_bad_value_in_the_environment_is_refused_naming_its_setting(field, value, monkeypatch) -> None:
    monkeypatch.setenv(f"METANET_{field.upper()}", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [e["loc"] for e in caught.value.errors()] == [(field,)]


def test_zero_turns_the_idle_heap_trim_off_and_the_default_is_one_second(monkeypatch) -> None:
    assert Settings().heap_trim_idle_s == 1.0
    monkeypatch.setenv("METANET_HEAP_TRIM_IDLE_S", "0")
    assert Settings().heap_trim_idle_s == 0.0


def test_the_overload_factor_is_off_at_zero_and_says_what_it_takes(monkeypatch) -> None:
    assert Settings().overload_forward_factor == 1.25 and Settings().overload_demand == 0
    monkeypatch.setenv("METANET_OVERLOAD_FORWARD_FACTOR", "0")
    assert Settings().overload_forward_factor == 0
    monkeypatch.setenv("METANET_OVERLOAD_FORWARD_FACTOR", "0.9")
    with pytest.raises(ValidationError, match="0 \\(off\\) or at least 1"):
        Settings()


def test_the_default_keep_alive_outlives_the_longest_retry_after_a_client_may_wait() -> None:
    # metanet_client and the serving benchmark wait up to 10% past a Retry-After
    assert Settings().keep_alive_s > 1.1 * RETRY_AFTER_MAX_S + 2
