"""fedkd: simulate federated and decentralized knowledge distillation on edge devices."""
import os

# Flower phones home unless told not to; a simulator has no reason to.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
