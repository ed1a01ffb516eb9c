"""The blocking facade, as a notebook uses it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rayvllm_nb.types import ClusterInfo
from tests.conftest import REPO

_NOTEBOOK_WITH_NEST_ASYNCIO = r"""
import asyncio
import {module}
{module}.apply()
import rayvllm_nb

async def cell():
    info = rayvllm_nb.init()
    status = rayvllm_nb.status()
    awaited = await rayvllm_nb.ray_backend.get_status()
    return info.address, status.cluster.address, awaited.cluster.address

loop = asyncio.new_event_loop()
addresses = loop.run_until_complete(cell())
assert len(set(addresses)) == 1, addresses
print("OK", addresses[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["nest_asyncio", "nest_asyncio2"])
def test_blocking_facade_survives_a_user_applied_nest_asyncio(cluster: ClusterInfo, module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _NOTEBOOK_WITH_NEST_ASYNCIO.format(module=module)],
        capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"OK {cluster.address}"
