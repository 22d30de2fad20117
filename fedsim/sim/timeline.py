"""A round whose participants cannot affect one another, computed at once: its timeline, rows and outcomes.

On private links (no shared network), with no quorum and nobody leaving mid-round, a participant's round is a
fixed chain of phases: download, forward, one backward phase per layer (last layer first) and, in
`after_compute` mode, one upload per delivered layer. Each phase ends at `start + duration`, one phase after
another, until a phase would end after the deadline; the device then works until the deadline and is cut
(`fedsim.sim.device_round` explains the rules). Nothing another device does changes this chain, so the whole
round is array arithmetic: phase end times are cumulative sums (the same additions, in the same order, as
SimPy's clock makes), the first phase past the deadline is found with one comparison, and the energies and
per-phase seconds are products and running sums.

Row order. The event path (`DeviceRound`) writes each row when SimPy processes an event, and SimPy processes
events by time, then by the order they were scheduled in. A phase's end is scheduled when the phase before it
ends (or, for the download, when the round starts, participant by participant), and the round's deadline is
scheduled before any of them. So two events at the same instant come in the order their scheduling events came
in: the order of a round is the fixed point of "by time, then by the rank of the event that scheduled it",
which `_event_order` finds by sorting by time and re-ranking only the events that share an instant with
another. The rows are those of `DeviceRound`, value for value and in the same order; tests/test_timeline.py
checks this against the event path on random fleets built to have ties, phases ending exactly at the deadline
and zero-length phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.output.trace import EventKind
from fedsim.sim.outcomes import RoundOutcomes
from fedsim.sim.round_setup import RoundSetup, power_table
from fedsim.spec.scenario import UploadMode
from fedsim.world.stragglers import NOT_A_STRAGGLER, deepest_layers

__all__ = ["Timeline", "computable", "compute_timeline"]

# the phases of a chain
_DOWNLOAD, _FORWARD, _BACKWARD, _UPLOAD = 0, 1, 2, 3
# the codes of this module's rows (0-3: the phases, whose codes are also their end rows') as positions in EventKind
_KINDS = list(EventKind)
_EVENT_POSITION = np.array([_KINDS.index(k) for k in (
    EventKind.DOWNLOAD_END, EventKind.FORWARD_END, EventKind.BACKWARD_END, EventKind.UPLOAD_END,
    EventKind.DOWNLOAD_START, EventKind.UPLOAD_START, EventKind.CUT, EventKind.STRAGGLER)], dtype=np.int64)
_DOWNLOAD_START, _UPLOAD_START, _CUT, _STRAGGLER = 4, 5, 6, 7


@dataclass(frozen=True)
class Timeline:
    """What a round's participants did: each one's outcome, the round's end and its event rows."""
    outcomes: RoundOutcomes
    finish_at: np.ndarray         # (n,) when each participant stopped working
    end_at: float                 # when the last one did (the start if there is none)
    rows: dict[str, np.ndarray]   # the events rows after `round_start`, as columns of the events table (`event`:
                                  # positions in `EventKind`, as `TraceWriter.event_rows` takes them)


def computable(setup: RoundSetup) -> bool:
    """Whether the round's participants cannot affect one another (given that nobody leaves mid-round)."""
    return (setup.network is None and setup.quorum is None
            and setup.upload_mode in (UploadMode.IDEAL, UploadMode.AFTER_COMPUTE))


def compute_timeline(setup: RoundSetup, start_at: float, deadline_at: float | None) -> Timeline:
    """The round of `setup` started at `start_at`, every participant staying online until it stops working."""
    plan = setup.plan
    n = plan.n
    limit_at = np.inf if deadline_at is None else deadline_at
    uploads = setup.upload_mode is UploadMode.AFTER_COMPUTE
    target = plan.target_depth.astype(np.int64)
    n_steps = 2 + target * (2 if uploads else 1)           # phases in each chain
    width = 2 + plan.backward_s.shape[1] * (2 if uploads else 1)
    step = np.arange(width)[None, :]
    # each chain's phase at each step: its kind and its layer index in backward order
    kind = np.where(step == 0, _DOWNLOAD, np.where(step == 1, _FORWARD,
                    np.where(step < 2 + target[:, None], _BACKWARD, _UPLOAD)))
    k = np.where(kind == _BACKWARD, step - 2, np.where(kind == _UPLOAD, step - 2 - target[:, None], 0))
    exists = step < n_steps[:, None]
    k = np.where(exists, k, 0)
    rows_n = np.arange(n)[:, None]
    dur_s = np.where(kind == _DOWNLOAD, plan.download_s[:, None],
                   np.where(kind == _FORWARD, plan.forward_s[:, None],
                            np.where(kind == _BACKWARD, plan.backward_s[rows_n, k], plan.upload_s[rows_n, k])))
    dur_s = np.where(exists, dur_s, 0.0)
    # end times, added one phase after another from the start, as SimPy's clock adds them
    phase_end_at = np.empty((n, width))
    at = np.full(n, float(start_at))
    for s in range(width):
        at = at + dur_s[:, s]
        phase_end_at[:, s] = at
    # phases done: those before the first that would end after the deadline
    over = (phase_end_at > limit_at) | ~exists
    done = np.where(over.any(axis=1), over.argmax(axis=1), width).astype(np.int64)
    cut = done < n_steps
    began_at = np.where(done > 0, phase_end_at[np.arange(n), np.maximum(done - 1, 0)], float(start_at))
    waits = cut & (began_at < limit_at)          # cut at the deadline, by its event; others at once
    finish_at = np.where(cut, np.where(waits, limit_at, began_at), began_at)

    power = power_table(setup.powers)            # (n, 4): rx, compute, compute, tx by phase kind
    cut_kind = kind[np.arange(n), np.minimum(done, width - 1)]
    cut_s = np.where(cut, finish_at - began_at, 0.0)
    chains = _Chains(kind=kind, k=k, dur_s=dur_s, phase_end_at=phase_end_at, energy_j=power[rows_n, kind] * dur_s,
                     n_steps=n_steps, target=target, done=done, cut=cut, waits=waits, cut_kind=cut_kind, cut_s=cut_s,
                     cut_j=power[np.arange(n), cut_kind] * cut_s, finish_at=finish_at)
    rows = _rows(setup, start_at, chains, _event_order(chains, limit_at))
    end = float(finish_at.max()) if n else float(start_at)
    return Timeline(_outcomes(chains, uploads), finish_at, end, rows)


@dataclass(frozen=True)
class _Chains:
    """Every participant's chain of phases (rows: participants; columns of the (n, width) arrays: steps)."""
    kind: np.ndarray            # (n, width) phase kind at each step (_DOWNLOAD, _FORWARD, _BACKWARD, _UPLOAD)
    k: np.ndarray               # (n, width) the layer's index in backward order (backward and upload steps)
    dur_s: np.ndarray           # (n, width) each phase's duration, 0 past the chain's end
    phase_end_at: np.ndarray    # (n, width) when each phase ends if it runs
    energy_j: np.ndarray        # (n, width) each phase's energy if it runs
    n_steps: np.ndarray         # (n,) phases in the chain
    target: np.ndarray          # (n,) layers it intends to deliver
    done: np.ndarray            # (n,) phases done (those before the first past the deadline)
    cut: np.ndarray             # (n,) cut before its chain's end
    waits: np.ndarray           # (n,) cut by the deadline's event (the others: at once, at the deadline already)
    cut_kind: np.ndarray        # (n,) the kind of the phase under way at the cut
    cut_s: np.ndarray           # (n,) its seconds up to the cut (0 if not cut)
    cut_j: np.ndarray           # (n,) their energy
    finish_at: np.ndarray       # (n,) when it stopped working


@dataclass(frozen=True)
class _Order:
    """The order SimPy processes a round's events in: the phase ends done (flat index: participant by participant,
    step by step), and the deadline if it cuts someone (the last index)."""
    events: np.ndarray          # event indices in processing order
    ev_dev: np.ndarray          # each phase end's participant
    ev_step: np.ndarray         # and step
    ev_pos: np.ndarray          # each phase end's position in the order
    deadline_pos: int           # the deadline's position, -1 if it cuts nobody


def _outcomes(c: _Chains, uploads: bool) -> RoundOutcomes:
    """Each participant's seconds per phase, summed one phase after another as `DeviceRound` does (adding 0.0
    for a phase of another kind changes no sum)."""
    kind, dur_s, done, cut, cut_kind, cut_s, finish_at, target = (c.kind, c.dur_s, c.done, c.cut, c.cut_kind, c.cut_s,
                                                                 c.finish_at, c.target)
    n, width = kind.shape
    download_s = np.where(done > 0, dur_s[:, 0], 0.0)
    compute_s, upload_s = np.zeros(n), np.zeros(n)
    for s in range(1, width):
        d = np.where(s < done, dur_s[:, s], 0.0)
        is_upload = kind[:, s] == _UPLOAD
        compute_s = compute_s + np.where(is_upload, 0.0, d)
        if uploads:
            upload_s = upload_s + np.where(is_upload, d, 0.0)
    spent = np.where(cut, cut_s, 0.0)          # the phase under way at the cut, up to it
    download_s = download_s + np.where(cut_kind == _DOWNLOAD, spent, 0.0)
    compute_s = compute_s + np.where((cut_kind == _FORWARD) | (cut_kind == _BACKWARD), spent, 0.0)
    upload_s = upload_s + np.where(cut_kind == _UPLOAD, spent, 0.0)
    computed = np.clip(done - 2, 0, target)
    depth = np.clip(done - 2 - target, 0, target) if uploads else computed
    return RoundOutcomes(depth=depth, layers_computed=computed, download_s=download_s, compute_s=compute_s,
                         upload_s=upload_s, active_until_at=np.maximum(0.0, finish_at),
                         done_at=np.where(cut, np.nan, finish_at), offline=np.zeros(n, dtype=bool),
                         stopped=np.zeros(n, dtype=bool), nonfinite=np.zeros(n, dtype=bool))


def _event_order(c: _Chains, limit_at: float) -> _Order:
    """The order SimPy processes the round's events in: by time, then by the order they were scheduled in."""
    phase_end_at, done, waits, n = c.phase_end_at, c.done, c.waits, len(c.done)
    counts = done
    first = np.concatenate([[0], np.cumsum(counts)])
    n_ev = int(first[-1])
    ev_dev = np.repeat(np.arange(n), counts)
    ev_step = np.arange(n_ev) - first[ev_dev]
    times = phase_end_at[np.arange(phase_end_at.shape[1])[None, :] < done[:, None]]     # flat order: device, then step
    has_deadline = bool(waits.any())
    if has_deadline:
        times = np.append(times, limit_at)
    total = len(times)
    # the rank of what scheduled each event: the event before it in its chain, or its device's start (all before
    # any event, in participant order), or, for the deadline, the round itself (before every start)
    parent = np.where(ev_step > 0, np.arange(n_ev) - 1, -1)
    start_rank = ev_dev - n - 1
    if has_deadline:
        parent = np.append(parent, -1)
        start_rank = np.append(start_rank, -n - 2)
    order = np.argsort(times, kind="stable")
    sorted_t = times[order]
    same = sorted_t[1:] == sorted_t[:-1]
    pos = np.empty(total, dtype=np.int64)
    pos[order] = np.arange(total)
    if same.any():
        tied = np.zeros(total, dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        slots = np.flatnonzero(tied)
        has_parent = parent >= 0
        for _ in range(total + 1):
            members = order[slots]
            rank = np.where(has_parent[members], pos[np.maximum(parent[members], 0)], start_rank[members])
            again = members[np.lexsort((rank, times[members]))]
            if np.array_equal(again, members):
                break
            order[slots] = again
            pos[again] = slots
        else:       # each pass places one more link of every chain of ties: a chain is shorter than the events
            raise RuntimeError("the order of a round's simultaneous events did not settle")
    return _Order(order, ev_dev, ev_step, pos[:n_ev], int(pos[-1]) if has_deadline else -1)


def _rows(setup: RoundSetup, start_at: float, c: _Chains, o: _Order) -> dict[str, np.ndarray]:
    """The events rows of the participants, in the order `DeviceRound`s write them.

    Rows come in groups, one per thing processed: each participant's start (in participant order: its
    straggler row, its download start, a cut at once if the deadline is already there), then each event in the
    order SimPy processes it (a phase end: its row, the next upload's start, a cut at once if the next phase
    cannot start any more; the deadline: the cuts of the devices waiting for it, in the order they began to
    wait). Each row is written at its group's offset plus its place in the group."""
    plan = setup.plan
    kind, k, phase_end_at, energy, done, cut, waits = c.kind, c.k, c.phase_end_at, c.energy_j, c.done, c.cut, c.waits
    cut_j, finish_at, n_steps = c.cut_j, c.finish_at, c.n_steps
    order, ev_dev, ev_step, ev_pos, deadline_pos = o.events, o.ev_dev, o.ev_step, o.ev_pos, o.deadline_pos
    n, width = plan.n, kind.shape[1]
    layer_order = np.asarray(plan.layer_order, dtype=np.int64)
    devices = plan.devices.astype(np.int64)
    now_cut = cut & ~waits
    drawn = setup.straggler_depth
    straggler = np.zeros(n, dtype=np.int64) if drawn is None else (drawn != NOT_A_STRAGGLER).astype(np.int64)
    root_cut = (now_cut & (done == 0)).astype(np.int64)
    root_size = straggler + 1 + root_cut
    # the events, in flat order (participant by participant, phase by phase): their rows' sizes
    mask = np.arange(width)[None, :] < done[:, None]          # the phases done, in flat order
    ph = kind[mask]
    i, s = ev_dev, ev_step
    nxt = np.minimum(s + 1, width - 1)
    up = (s + 1 < n_steps[i]) & (kind[i, nxt] == _UPLOAD)
    ev_cut = (s + 1 == done[i]) & now_cut[i]
    group_size = np.zeros(len(order), dtype=np.int64)
    group_size[ev_pos] = 1 + up + ev_cut
    w = np.flatnonzero(waits)
    if deadline_pos >= 0:
        group_size[deadline_pos] = len(w)
    root_at = np.cumsum(root_size) - root_size
    group_at = int(root_size.sum()) + np.cumsum(group_size) - group_size
    total = int(root_size.sum() + group_size.sum())
    cols = {"time_s": np.empty(total), "device": np.empty(total, dtype=np.int64),
            "event": np.full(total, -1, dtype=np.int64), "layer": np.full(total, -1, dtype=np.int64),
            "bytes": np.zeros(total, dtype=np.int64), "energy_j": np.zeros(total)}

    def put(at, t, d, what, lay=None, nbytes=None, joules=None):
        cols["time_s"][at] = t
        cols["device"][at] = devices[d]
        cols["event"][at] = what
        if lay is not None:
            cols["layer"][at] = lay
        if nbytes is not None:
            cols["bytes"][at] = nbytes
        if joules is not None:
            cols["energy_j"][at] = joules

    def layer_of(devs, steps):
        """The layer (forward index) of each phase: -1 for the download and the forward pass."""
        return np.where(kind[devs, steps] >= _BACKWARD, layer_order[k[devs, steps]], -1)

    idx = np.arange(n)
    if drawn is not None:
        st = np.flatnonzero(straggler)
        put(root_at[st], start_at, st, _STRAGGLER, deepest_layers(plan, drawn[st]))
    put(root_at + straggler, start_at, idx, _DOWNLOAD_START)
    rc = np.flatnonzero(root_cut)
    put(root_at[rc] + straggler[rc] + 1, start_at, rc, _CUT, -1, None, cut_j[rc])
    at = group_at[ev_pos]
    nbytes = np.zeros(len(i), dtype=np.int64)
    down, upl = ph == _DOWNLOAD, ph == _UPLOAD
    nbytes[down] = plan.download_bytes[i[down]]
    nbytes[upl] = plan.upload_bytes[i[upl], k[i[upl], s[upl]]]
    put(at, phase_end_at[mask], i, ph, np.where(ph >= _BACKWARD, layer_order[k[mask]], -1), nbytes, energy[mask])
    put(at[up] + 1, phase_end_at[i[up], s[up]], i[up], _UPLOAD_START, layer_order[k[i[up], nxt[up]]])
    c = ev_cut
    ci = i[c]
    put(at[c] + 1 + up[c], phase_end_at[ci, s[c]], ci, _CUT, layer_of(ci, done[ci]), None, cut_j[ci])
    if deadline_pos >= 0:       # the deadline's cuts, in the order the devices began to wait for it
        waited_from = w - n - 1                           # since its start (starts come before every event)
        since = done[w] > 0                               # since the end of its last phase
        waited_from[since] = _last_event_pos(ev_pos, done, w[since])
        w = w[np.argsort(waited_from, kind="stable")]
        put(group_at[deadline_pos] + np.arange(len(w)), finish_at[w], w, _CUT,
            layer_of(w, np.minimum(done[w], width - 1)), None, cut_j[w])
    if (cols["event"] < 0).any():          # every row's place was counted: a gap would be a miscount
        raise RuntimeError("a computed round left a row unwritten")
    cols["event"] = _EVENT_POSITION[cols["event"]]
    return {"round": np.full(total, int(setup.round), dtype=np.int64), **cols}


def _last_event_pos(ev_pos, done, devices):
    """The position of each device's last phase end (devices that ended at least one phase)."""
    first = np.concatenate([[0], np.cumsum(done)])
    return ev_pos[first[devices] + done[devices] - 1]
