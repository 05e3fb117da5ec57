"""Federated rounds (issue 14, in progress): client selection, local training from the global model (optionally
with FedProx), aggregation by the merge engine's strategies, and a server optimiser on the aggregated delta.

The round logic here does not know about any transport: ``rounds.run_rounds`` drives it in one process, and the
Flower apps (``flower.py``) call the same pieces from a ``ServerApp`` strategy and a ``ClientApp``.
"""
