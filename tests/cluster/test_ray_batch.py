"""`lmk batch --ray` options (lmkernel/cluster/ray_batch.py), checked before Ray starts (Ray is never started here)."""

from __future__ import annotations

import pytest

from lmkernel.cluster.ray_batch import RayBatchOptions
from lmkernel.errors import LmkError


def test_the_defaults_pass_and_check_returns_the_options() -> None:
    options = RayBatchOptions()
    assert options.check() is options
    assert (options.replicas, options.replica_cpus, options.ray_address, options.block_size) == (2, 1.0, None, 32)
    fractional = RayBatchOptions(replicas=1, replica_cpus=0.5)
    assert fractional.check() is fractional


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 0}, "--replicas must be at least 1; got 0"),
    ({"replicas": -3}, "--replicas must be at least 1; got -3"),
    ({"replica_cpus": 0.0}, "--replica-cpus must be positive; got 0.0"),
    ({"replica_cpus": -1.0}, "--replica-cpus must be positive; got -1.0"),
    ({"replica_cpus": float("nan")}, "--replica-cpus must be positive; got nan"),
])
def test_bad_options_name_their_flag_and_value(kwargs, message) -> None:
    with pytest.raises(LmkError) as caught:
        RayBatchOptions(**kwargs).check()
    assert str(caught.value) == message
