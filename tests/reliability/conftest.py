"""The serving fixtures (a tiny random checkpoint, its raw-protocol policy and server) shared with tests/serve."""

from serve.conftest import checkpoint, policy, raw_policy, raw_server  # noqa: F401  (fixtures)
