"""Availability churn: exact switch times from files and fixed durations, long-run fractions, bad files."""

from __future__ import annotations

import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import simpy

from fedsim.spec.availability import ChurnSpec, InitialState, read_availability_file, read_churn_spec
from fedsim.world.churn import (
    AlwaysOnline, RenewalAvailability, _splitmix64, build_availability, churn, load_availability_trace,
)
from fedsim.spec.distributions import Dist, DistKind
from fedsim.errors import DataError, ScenarioError
from fedsim.spec.fields import Fields

TRACE = """device,start_s,end_s
0,0,10
1,5,7.5
0,12,20
2,3,4
2,4,6
"""
# Device 2's touching intervals merge into [3, 6); device 3 is never online.
EXPECTED_ONLINE = {0: [0], 2.9: [0], 3: [0, 2], 5: [0, 1, 2], 6: [0, 1], 7.5: [0], 10: [], 11.5: [], 12: [0],
                   19.99: [0], 20: [], 1e9: []}
EXPECTED_SWITCHES = [(3.0, 2, True), (5.0, 1, True), (6.0, 2, False), (7.5, 1, False), (10.0, 0, False),
                     (12.0, 0, True), (20.0, 0, False)]


def record(env, availability, devices):
    events = []
    proc = env.process(churn(env, availability, devices,
                             lambda ds, ons: events.extend((env.now, d, on) for d, on in zip(ds, ons))))
    return events, proc


def fixed(value):
    return Dist(DistKind.FIXED, value)


def exponential(mean):
    return Dist(DistKind.EXPONENTIAL, mean)


@pytest.fixture(params=["csv", "parquet"])
def trace_file(request, tmp_path):
    path = tmp_path / "avail.csv"
    path.write_text(TRACE)
    if request.param == "parquet":
        table = pacsv.read_csv(path)
        path = tmp_path / "avail.parquet"
        pq.write_table(table, path)
    return path


def test_trace_gives_the_intended_online_sets_and_switch_times(trace_file):
    avail = load_availability_trace(trace_file, 4)
    for at, online in EXPECTED_ONLINE.items():
        assert avail.online_devices(at).tolist() == online, at
        assert [avail.is_online(d, at) for d in range(4)] == [d in online for d in range(4)]
    env = simpy.Environment()
    events, _ = record(env, avail, range(4))
    env.run()
    assert events == EXPECTED_SWITCHES
    # Watching a subset from a later start time.
    env = simpy.Environment()
    env.run(until=5.0)
    events, _ = record(env, avail, [0, 1])
    env.run()
    assert events == [(7.5, 1, False), (10.0, 0, False), (12.0, 0, True), (20.0, 0, False)]


def test_fixed_durations_give_exact_switch_times():
    spec = ChurnSpec(fixed(2.5), fixed(0.75), InitialState.ONLINE)
    late = ChurnSpec(fixed(2.5), fixed(0.75), InitialState.OFFLINE)
    avail = RenewalAvailability(np.array([0, 1, 2]), [spec, late, None], np.random.default_rng(0))
    env = simpy.Environment()
    events, proc = record(env, avail, [0, 1, 2])
    env.run(until=7.0)
    assert events == [(0.75, 1, True), (2.5, 0, False), (3.25, 0, True), (3.25, 1, False), (4.0, 1, True),
                      (5.75, 0, False), (6.5, 0, True), (6.5, 1, False)]
    assert [avail.is_online(0, t) for t in (0, 2.4, 2.5, 3.2, 3.25, 100 * 3.25 + 1)] == [True, True, False, False,
                                                                                           True, True]
    assert avail.is_online(2, 1e6)   # a class without churn is always online
    proc.interrupt()   # stops watching
    env.run(until=20)
    assert events[-1] == (6.5, 1, False)


def test_exponential_durations_have_the_right_long_run_online_fraction():
    spec = ChurnSpec(exponential(600.0), exponential(120.0), InitialState.STATIONARY)
    n = 20_000
    avail = RenewalAvailability(np.zeros(n, dtype=np.int64), [spec], np.random.default_rng(5))
    target = 600 / 720
    for at in (0.0, 300.0, 5_000.0, 50_000.0):
        assert avail.online_mask(np.arange(n), at).mean() == pytest.approx(target, abs=0.01), at
    # A single device's time average over a long horizon.
    one = RenewalAvailability(np.zeros(1, dtype=np.int64), [spec], np.random.default_rng(6))
    env = simpy.Environment()
    events, _ = record(env, one, [0])
    env.run(until=2e6)
    times = [0.0] + [t for t, _, _ in events] + [2e6]
    states = [one.is_online(0, 0.0)] + [on for _, _, on in events]
    online_time = sum(b - a for a, b, s in zip(times, times[1:], states) if s)
    assert online_time / 2e6 == pytest.approx(target, abs=0.02)


def test_stationary_start_with_fixed_periods_is_stationary():
    spec = ChurnSpec(fixed(3.0), fixed(1.0), InitialState.STATIONARY)
    n = 40_000
    avail = RenewalAvailability(np.zeros(n, dtype=np.int64), [spec], np.random.default_rng(2))
    for at in (0.0, 0.5, 1.7, 10.25):
        assert avail.online_mask(np.arange(n), at).mean() == pytest.approx(0.75, abs=0.01), at
    switch_at, online_after = avail.next_switches(np.arange(n), 10.25)
    assert np.all(switch_at > 10.25) and np.all(switch_at <= 10.25 + 3.0)


def test_draws_do_not_depend_on_query_pattern_or_other_devices():
    spec = ChurnSpec(Dist(DistKind.LOGNORMAL, 50.0, 0.8), Dist(DistKind.UNIFORM, 5.0, 30.0), InitialState.STATIONARY)
    cls = np.zeros(500, dtype=np.int64)
    a = RenewalAvailability(cls, [spec], np.random.default_rng(11))
    b = RenewalAvailability(cls, [spec], np.random.default_rng(11))
    for t in np.arange(0.0, 5000.0, 7.0):   # a queried in small steps, b once at the end
        a.online_mask(np.arange(0, 500, 3), t)
    assert np.array_equal(a.next_switches(np.arange(500), 5000.0)[0], b.next_switches(np.arange(500), 5000.0)[0])
    # Going back in time replays the same stream.
    before = [b.is_online(7, t) for t in (10.0, 100.0, 1000.0)]
    assert [a.is_online(7, t) for t in (10.0, 100.0, 1000.0)] == before
    c = RenewalAvailability(cls, [spec], np.random.default_rng(12))
    assert not np.array_equal(c.next_switches(np.arange(500), 0.0)[0], b.next_switches(np.arange(500), 0.0)[0])


def test_counter_stream_is_splitmix64():
    # The published first outputs of SplitMix64 seeded with 0.
    out = _splitmix64(np.uint64(0), np.array([1, 2, 3], dtype=np.uint64))
    assert [int(x) for x in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_build_availability_and_always_online():
    avail = build_availability(np.zeros(3, dtype=np.int64), [None], np.random.default_rng(0))
    assert isinstance(avail, AlwaysOnline) and avail.online_devices(5.0).tolist() == [0, 1, 2]
    assert avail.next_switches(np.arange(3), 0.0)[0].tolist() == [np.inf] * 3


class StubRound:
    """What `ServerBase.stop_departed` touches of a `DeviceRound`: `is_alive` and `interrupt` (which, like the
    real one, refuses a round that has ended). Its work is a chain of two phases: 1 s, then `ends_at - 1` s."""

    def __init__(self, env, device, ends_at, log):
        self.env, self.device, self.log, self.is_alive = env, device, log, True
        env.timeout(1.0).callbacks.append(lambda _: env.timeout(ends_at - 1.0).callbacks.append(self._done))

    def _done(self, _event):
        if self.is_alive:
            self.is_alive = False
            self.log.append((self.env.now, self.device, "done"))

    def interrupt(self, cause):
        if not self.is_alive:
            raise RuntimeError("interrupted after its end")
        self.is_alive = False
        self.log.append((self.env.now, self.device, cause))


def test_server_stops_exactly_the_rounds_of_devices_going_offline():
    """`churn` + `ServerBase.stop_departed`, as `Server.watch` wires them. Switch times by hand:
    class 0 online for 1.5 s then offline 1.0 s (off at 1.5, on at 2.5, off at 4.0); class 1 starts offline for
    0.75 s (on at 0.75, off at 2.25); class 2 has no churn.
      device 0 (class 0), round until 10: stopped at 1.5, and not again at 4.0 (its round is over);
      device 1 (class 0), round ends at exactly 1.5: done (a phase ending as its device leaves counts, although
        its second phase's timer was created at t = 1, after the watcher's timer for 1.5);
      device 2 (class 1), round until 10: going online at 0.75 stops nothing; stopped at 2.25;
      device 3 (class 2), round until 10: done at 10;
      device 4 (class 0) is watched but has no round under way: its switches stop nothing."""
    from fedsim.sim.device_round import StopCause
    from fedsim.sim.server import ServerBase

    specs = [ChurnSpec(fixed(1.5), fixed(1.0), InitialState.ONLINE),
             ChurnSpec(fixed(1.5), fixed(0.75), InitialState.OFFLINE), None]
    avail = RenewalAvailability(np.array([0, 0, 1, 2, 0]), specs, np.random.default_rng(0))
    env = simpy.Environment()
    log = []
    server = ServerBase.__new__(ServerBase)          # only its `active` map is used
    server.active = {d: StubRound(env, d, ends_at, log) for d, ends_at in ((0, 10.0), (1, 1.5), (2, 10.0),
                                                                            (3, 10.0))}
    env.process(churn(env, avail, range(5), server.stop_departed))
    env.run(until=12.0)
    assert log == [(1.5, 1, "done"), (1.5, 0, StopCause.OFFLINE), (2.25, 2, StopCause.OFFLINE), (10.0, 3, "done")]


def read(text, key="availability"):
    raw = tomllib.loads(text)
    return read_churn_spec(Fields(raw, "s.toml", "fleet.classes[0]"), key)


def test_read_churn_spec():
    spec = read('availability = { on_s = { dist = "exponential", mean = 600 }, off_s = 120 }')
    assert spec == ChurnSpec(exponential(600.0), fixed(120.0), InitialState.STATIONARY)
    assert read('availability = { on_s = 1, off_s = 2, initial = "offline" }').initial is InitialState.OFFLINE
    assert read('availability = { on_s = 1, off_s = 2, initial = 0.25 }').online_prob == 0.25
    assert read("other = 1", key="availability") is None
    for text, field in [('availability = { on_s = 1 }', "fleet.classes[0].availability.off_s"),
                        ('availability = { on_s = 1, off_s = 0 }', "fleet.classes[0].availability.off_s"),
                        ('availability = { on_s = 1, off_s = 2, initial = 1.5 }',
                         "fleet.classes[0].availability.initial"),
                        ('availability = { on_s = 1, off_s = 2, initial = "sometimes" }',
                         "fleet.classes[0].availability.initial"),
                        ('availability = { on_s = 1, off_s = 2, of_s = 2 }', "fleet.classes[0].availability.of_s"),
                        ('availability = { on_s = { dist = "exponential" }, off_s = 2 }',
                         "fleet.classes[0].availability.on_s.mean")]:
        with pytest.raises(ScenarioError) as info:
            read(text)
        assert info.value.field == field, text


def test_read_availability_file(tmp_path):
    (tmp_path / "a.csv").write_text(TRACE)
    f = Fields({"availability_file": "a.csv"}, "s.toml", "fleet")
    assert read_availability_file(f, "availability_file", base_dir=tmp_path) == tmp_path / "a.csv"
    with pytest.raises(ScenarioError, match="fleet.availability_file: availability file does not exist"):
        read_availability_file(Fields({"availability_file": "b.csv"}, "s.toml", "fleet"), "availability_file", tmp_path)
    assert read_availability_file(Fields({}, "s.toml", "fleet"), "availability_file") is None


BAD_FILES = [
    ("device,start_s\n0,1\n", "missing column(s) end_s"),
    ("device,start_s,end_s\n0,1,2\n1,abc,3\n", "row 2 (line 3): start_s: not a number, got 'abc'"),
    ("device,start_s,end_s\n0,1,2\n1,,3\n", "row 2 (line 3): start_s: missing value"),
    ("device,start_s,end_s\n0,1,2\n1,3,3\n", "row 2 (line 3): start_s 3.0 must be before end_s 3.0"),
    ("device,start_s,end_s\n0,1,2\n0,5,9\n1,0,1\n0,8,10\n",
     "row 4 (line 5): device 0's interval [8.0, 10.0) starts before the end of its previous interval [5.0, 9.0) "
     "at row 2 (line 3)"),
    ("device,start_s,end_s\n0,5,9\n0,1,2\n", "row 2 (line 3): device 0's interval [1.0, 2.0) starts before"),
    ("device,start_s,end_s\n0,1,2\n4,1,2\n", "row 2 (line 3): device: id 4 out of range"),
    ("device,start_s,end_s\n0,1,2\n-1,1,2\n", "row 2 (line 3): device: id -1 out of range"),
    ("device,start_s,end_s\n0.5,1,2\n", "row 1 (line 2): device: not an integer id, got 0.5"),
    ("device,start_s,end_s\n0,1,inf\n", "row 1 (line 2): end_s: must be a finite number, got inf"),
    ("device,start_s,end_s\n0,nan,2\n", "row 1 (line 2): start_s: must be a finite number"),
    ("device,start_s,end_s\n", "no intervals"),
    ("device,start_s,end_s\n0,1,2\n1,2\n", "cannot read the availability file"),
]


@pytest.mark.parametrize("text, problem", BAD_FILES)
def test_bad_files_raise_data_errors_naming_file_and_row(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_availability_trace(path, 4)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_bad_parquet_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such availability file"):
        load_availability_trace(tmp_path / "none.csv", 4)
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: cannot read"):
        load_availability_trace(path, 4)
    pq.write_table(pa.table({"device": [0, 1], "start_s": [1.0, 5.0], "end_s": [2.0, 4.0]}), path)
    with pytest.raises(DataError, match=r"bad.parquet: row 2: start_s 5.0 must be before end_s 4.0"):
        load_availability_trace(path, 4)


def test_many_devices_one_process():
    """100,000 devices: one process, vectorised state; a selection query and an hour of churn stay quick."""
    n = 100_000
    spec = ChurnSpec(exponential(600.0), exponential(120.0), InitialState.STATIONARY)
    avail = RenewalAvailability(np.zeros(n, dtype=np.int64), [spec], np.random.default_rng(1))
    assert len(avail.online_devices(3600.0)) == pytest.approx(n * 600 / 720, rel=0.02)
    env = simpy.Environment()
    count = [0]
    env.process(churn(env, avail, np.arange(0, n, 10), lambda ds, ons: count.__setitem__(0, count[0] + len(ds))))
    env.run(until=600.0)
    # 10,000 watched devices, about 2 switches per 720 s each.
    assert count[0] == pytest.approx(10_000 * 600 * 2 / 720, rel=0.05)


def test_event_driven_online_set_equals_asking_every_device():
    """The online set kept event by event (rounds going forward, participants watched in between, a look back)
    gives the ids a fresh source gives when every device is asked at that time."""
    specs = [ChurnSpec(exponential(40.0), exponential(15.0), InitialState.STATIONARY), None,
             ChurnSpec(fixed(3.0), Dist(DistKind.UNIFORM, 1.0, 9.0), InitialState.OFFLINE)]
    cls = np.arange(3_000) % 3
    kept = RenewalAvailability(cls, specs, np.random.default_rng(4))
    times = [0.0, 0.0, 0.5, 0.5, 2.0, 3.0, 3.0, 7.25, 60.0, 61.0, 1.5, 62.0, 62.0, 500.0, 499.0, 900.0]
    watched = np.random.default_rng(0).choice(3_000, 300, replace=False)
    for at in times:
        fresh = RenewalAvailability(cls, specs, np.random.default_rng(4))
        expected = np.flatnonzero(fresh.online_mask(np.arange(3_000), at))
        got = kept.online_devices(at)
        assert np.array_equal(got, expected), at
        kept.next_switches(watched, at + 4.0)          # a round's watcher advances its participants further
    # nothing switched between two queries: the same array, not rebuilt
    assert kept.online_devices(904.0) is kept.online_devices(904.0)
    assert not kept.online_devices(904.0).flags.writeable      # the pool policies select from, shared


def test_trace_online_set_is_rebuilt_only_past_a_switch(trace_file):
    avail = load_availability_trace(trace_file, 4)
    first = avail.online_devices(5.0)
    assert avail.online_devices(5.9) is first and first.tolist() == [0, 1, 2]
    for at, online in list(EXPECTED_ONLINE.items())[::-1] + list(EXPECTED_ONLINE.items()):
        assert avail.online_devices(at).tolist() == online, at
