"""fedsim: a discrete-event simulator of federated learning on fleets of heterogeneous edge devices."""

__version__ = "0.1.0"

__all__ = ["__version__"]
