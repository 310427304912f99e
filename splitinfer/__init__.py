"""splitinfer: split computing for DNNs (shared core).

The core holds what every role needs: data readers, the embedded default model, the staged-model cutter,
codecs, exits, the plan bundle, energy modelling and the CLI root. It never imports the roles
(``edge_agent``, ``cloud_server``, ``partitioner``) except in :mod:`splitinfer.cli`.
"""

__version__ = "0.1.0"
