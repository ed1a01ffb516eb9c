"""Every error rayvllm_nb raises on purpose, in one tree.

```
RayVllmError                      base: catch this to catch them all
├── ConfigError (ValueError)      the config or an argument is wrong; nothing was deployed
├── ClusterError                  Ray could not be started or reached
├── DeploymentError               Serve or vLLM failed to deploy or serve the model
│   └── ReadinessTimeout (TimeoutError)  the model was not ready in time
└── NotDeployedError (LookupError)       no such model is running
```

Each message says what was wrong and how to fix it, in one paragraph. A command's exit code
comes from the type (:func:`exit_code`): 2 for what the user typed, 1 for what happened.
"""

from __future__ import annotations


class RayVllmError(Exception):
    """Base class of every error raised by rayvllm_nb."""


class ConfigError(RayVllmError, ValueError):
    """A config value or an argument is invalid; raised before anything is deployed."""


class ClusterError(RayVllmError):
    """Ray could not be started or connected to."""


class DeploymentError(RayVllmError):
    """Ray Serve or the vLLM engine failed to deploy or to serve the model."""


class ReadinessTimeout(DeploymentError, TimeoutError):
    """The model did not become ready within the timeout."""


class NotDeployedError(RayVllmError, LookupError):
    """The named model (or any model) is not running."""


_EXIT_CODES: dict[type[RayVllmError], int] = {ConfigError: 2, ClusterError: 1, DeploymentError: 1, NotDeployedError: 1}


def exit_code(error: RayVllmError) -> int:
    """The `rayvllm` exit code for ``error``: 2 when the input was wrong, 1 otherwise."""
    return next((code for kind, code in _EXIT_CODES.items() if isinstance(error, kind)), 1)
