"""Prefect flows that orchestrate medfed's federated rounds, and the `medfed` CLI."""
