"""The edge agent: runs the head of a split model with early exits and offloads the rest over gRPC.

Modules: :mod:`~edge_agent.settings` (configuration), :mod:`~splitinfer.imaging` (upload decoding, in the core),
:mod:`~edge_agent.runtime` (the data plane: head, exits, offload policy, fallback, energy),
:mod:`~edge_agent.metrics` (Prometheus families), :mod:`~edge_agent.app` (the local HTTP API) and
:mod:`~edge_agent.cli` (``python -m edge_agent run ...`` / ``splitinfer edge run ...``).
``edge_agent.transport`` is the gRPC client to the cloud server.
"""
