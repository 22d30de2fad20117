"""The simulated world: the fleet and its timing, availability churn, the network, real-device calibration."""
