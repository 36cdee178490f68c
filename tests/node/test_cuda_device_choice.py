"""The CUDA device a rank trains on comes from what it was given, never a fixed or wrapped index."""

from __future__ import annotations

import pytest

from node.errors import UsageError
from node.plan import cuda_device_index


@pytest.mark.parametrize("env,visible,expected", [
    ({}, 1, 0),                                              # one GPU per pod (device plugin)
    ({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "5"}, 1, 0),  # Slurm gave GPU 5: index 0 of 1
    ({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4, 3),  # torchrun rank 3 of 4
])
def test_local_rank_indexes_the_visible_devices(env: dict[str, str], visible: int,
                                                expected: int) -> None:
    assert cuda_device_index(env, visible) == expected


@pytest.mark.parametrize("env,visible", [
    ({"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, 2),  # would share GPU 0 with rank 0
    ({"LOCAL_RANK": "1"}, 1),
    ({"LOCAL_RANK": "0"}, 0),
    ({"LOCAL_RANK": "-1"}, 4),
    ({"LOCAL_RANK": "one"}, 4),
])
def test_a_rank_without_its_own_visible_device_is_refused(env: dict[str, str], visible: int) -> None:
    with pytest.raises(UsageError, match="LOCAL_RANK=.* CUDA device"):
        cuda_device_index(env, visible)
