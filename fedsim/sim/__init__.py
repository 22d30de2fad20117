"""The simulation: the round and asynchronous engines, one device's round, the servers, building a run."""
