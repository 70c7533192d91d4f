"""Ids that the request path generates."""

import re

from headrace.inference import BatchIds, RequestIds

HEX_32 = re.compile(r"[0-9a-f]{32}")


def test_request_ids_look_like_uuid_hex_and_never_repeat() -> None:
    ids = RequestIds()
    drawn = [ids.new() for _ in range(1000)]
    assert all(HEX_32.fullmatch(request_id) for request_id in drawn)
    assert len(set(drawn)) == len(drawn)


def test_request_ids_of_other_instances_differ() -> None:
    """Each instance (a worker, a restart) draws its own random half."""
    first, second = RequestIds().new(), RequestIds().new()
    assert first != second
    assert first[:16] != second[:16]


def test_batch_ids_are_unique_per_instance_and_across_instances() -> None:
    ids = BatchIds()
    assert len({ids.new() for _ in range(100)} | {BatchIds().new()}) == 101
