"""A transfer between the server and a device through a `fedsim.world.network.Network` (which imports this
module, so it is not imported here), as SimPy callbacks or as a generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import simpy

from fedsim.errors import FedsimError
from fedsim.spec.network import Direction

__all__ = ["Transfer", "TransferResult", "transfer"]


@dataclass(frozen=True)
class TransferResult:
    done: bool           # all bytes arrived (latency included) by until_at, if one was given
    start_at: float
    end_at: float        # arrival time if done; else until_at
    bytes_sent: float    # bytes that left the sender (all of them if done)
    bytes_end_at: float  # when the last byte left, or the flow was cut: the radio's airtime ends here



class Transfer:
    """One transfer as SimPy callbacks, no process: `then(TransferResult)` runs when it has arrived.

    Send `nbytes` between the server and `device`: the bytes go through at the shared rates, then the
    route's latency passes. With `until_at`, a transfer that cannot arrive by then is cut at `until_at`
    (its flow leaves the links then) and ends with done=False at `until_at`. `cancel()` (the device went
    offline) removes the flow at once, so the others speed up, and `then` is never called.
    """

    __slots__ = ("network", "device", "direction", "nbytes", "until_at", "then", "start_at", "_flow", "_waiting",
                 "_waiting_callback")

    def __init__(self, network, device: int, direction: Direction, nbytes: float,
                 until_at: float | None, then: Callable[[TransferResult], None]):
        if not nbytes >= 0:
            raise FedsimError(f"transfer: nbytes must be >= 0, got {nbytes!r}")
        self.network, self.device, self.direction, self.nbytes = network, int(device), direction, float(nbytes)
        self.until_at, self.then = until_at, then
        self.start_at = network.env.now
        self._flow = None          # the network's flow, once started
        self._waiting: simpy.Event | None = None
        self._waiting_callback = None

    def start(self) -> None:
        """Open the flow (a transfer of 0 bytes goes straight to its latency)."""
        if self.nbytes > 0:
            self._flow = self.network._open(self.device, self.direction, 8.0 * self.nbytes, self.until_at)
            self._wait(self._flow.event, self._bytes_out)
        else:
            self._bytes_out(None)

    def cancel(self) -> None:
        """Stop now: the flow leaves the links; nothing more happens."""
        if self._waiting is not None and self._waiting.callbacks is not None:
            self._waiting.callbacks.remove(self._waiting_callback)
        self._waiting = None
        if self._flow is not None and self._flow.active:
            self.network._close(self._flow)
        self.then = _ignore

    def _wait(self, event: simpy.Event, callback) -> None:
        self._waiting, self._waiting_callback = event, callback
        event.callbacks.append(callback)

    def _bytes_out(self, event: simpy.Event | None) -> None:
        env = self.network.env
        flow = self._flow
        delivered = True if event is None else event.value
        sent = self.nbytes if flow is None else (flow.total_bits - flow.remaining_bits) / 8.0
        bytes_end_at = env.now
        latency = float(self.network.topology.latency_s[self.device])
        until_at = self.until_at
        if delivered and (until_at is None or env.now + latency <= until_at):
            result = TransferResult(True, self.start_at, env.now + latency, sent, bytes_end_at)
            wait_s = latency
        else:
            end_at = env.now if until_at is None else max(until_at, env.now)
            result = TransferResult(False, self.start_at, end_at, sent, bytes_end_at)
            wait_s = end_at - env.now
        if wait_s > 0:
            self._wait(env.timeout(wait_s), lambda _event: self._end(result))
        else:
            self._end(result)

    def _end(self, result: TransferResult) -> None:
        self._waiting = None
        self.then(result)


def _ignore(_result) -> None:
    pass


def transfer(env: simpy.Environment, network, device: int, direction: Direction, nbytes: float, *,
             until_at: float | None = None):
    """`Transfer` as a SimPy generator for a process: returns its TransferResult.

    Interrupting the calling process (the device goes offline) cancels the transfer (its flow leaves the
    links at once, so the others speed up) and re-raises the Interrupt.
    """
    if env is not network.env:
        raise FedsimError("transfer: the network belongs to another SimPy environment")
    arrived = env.event()
    job = Transfer(network, device, direction, nbytes, until_at, arrived.succeed)
    job.start()
    try:
        return (yield arrived)
    except simpy.Interrupt:
        job.cancel()
        raise
