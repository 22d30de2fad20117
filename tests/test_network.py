"""Transfer times under max-min fair sharing, checked against hand-computed fluid-model answers.

Capacities and sizes are chosen so that every rate, remaining size and timestamp is exact in binary
floating point (e.g. 8e6 bit/s = 1 MB/s, shares of 1.5 and 0.75 MB/s); times are compared with ==.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import simpy

from fedsim.errors import FedsimError, ScenarioError
from fedsim.spec.fields import Fields
from fedsim.world.network import (
    AccessKind, Direction, Network, Preset, build_topology, max_min_rates, path_gain, rayleigh_power_gain,
    read_network_spec, shannon_rate_bps, transfer,
)

MB = 1_000_000


def spec_of(text: str, classes, ignore=()):
    raw = tomllib.loads(text)
    return read_network_spec(Fields(raw.get("network", {}), "t.toml", "network"), classes, ignore)


def network(text: str, counts: dict[str, int], down_bps=8e6, up_bps=8e6, latency_s=0.0, seed=0):
    spec = spec_of(text, list(counts))
    class_of = np.repeat(np.arange(len(counts)), list(counts.values()))
    n = len(class_of)
    topo = build_topology(spec, class_of=class_of, downlink_bps=np.broadcast_to(down_bps, n).copy(),
                          uplink_bps=np.broadcast_to(up_bps, n).copy(), latency_s=np.full(n, latency_s),
                          rng=np.random.default_rng(seed))
    env = simpy.Environment()
    return env, Network(env, topo)


def start(env, net, device, nbytes, at=0.0, direction=Direction.DOWN, until_at=None):
    """Start a transfer at `at`; the returned process's value is the TransferResult."""
    def proc():
        if at > 0:
            yield env.timeout(at)
        return (yield from transfer(env, net, device, direction, nbytes, until_at=until_at))
    return env.process(proc())


# One shared link of C bit/s between an access point and the server; devices have no private link.
SHARED = """
[network]
upload_mode = "streaming"
[[network.nodes]]
name = "server"
kind = "server"
[[network.nodes]]
name = "ap"
kind = "ap"
[[network.links]]
a = "ap"
b = "server"
bandwidth_bps = {c}
latency_s = {lat}
[network.classes.phones]
attach = "ap"
access = "none"
"""


def shared(capacity_bps, n, latency_s=0.0):
    spec_text = SHARED.format(c=capacity_bps, lat=latency_s)
    return network(spec_text.replace('upload_mode = "streaming"\n', ""), {"phones": n})


def test_single_flow_takes_latency_plus_size_over_capacity():
    env, net = shared(8e6, 1, latency_s=0.25)
    p = start(env, net, 0, 3 * MB)
    env.run()
    assert p.value.done and p.value.end_at == 3.25 and p.value.bytes_sent == 3 * MB
    # The same through a private star link, with the device's own latency.
    env, net = network("", {"c": 1}, down_bps=8e6, latency_s=0.25)
    p = start(env, net, 0, 3 * MB)
    env.run()
    assert p.value.end_at == 3.25


def test_two_equal_flows_share_the_link_equally():
    env, net = shared(8e6, 2, latency_s=0.125)
    a, b = start(env, net, 0, MB), start(env, net, 1, MB)
    env.run(until=0.5)
    assert sorted(net.rates_bps().values()) == [4e6, 4e6]
    env.run()
    assert a.value.end_at == b.value.end_at == 2 * 8 * MB / 8e6 + 0.125


def test_smaller_flow_finishes_then_larger_speeds_up():
    env, net = shared(8e6, 2)
    small, large = start(env, net, 0, MB), start(env, net, 1, 3 * MB)
    env.run()
    assert small.value.end_at == 2 * 8 * MB / 8e6          # 2 s at C/2
    assert large.value.end_at == 2.0 + 8 * (3 * MB - MB) / 8e6   # then 2 MB alone at C: 4 s


def test_third_flow_joining_midway_reshares_everyone():
    # C = 3 MB/s. A = 6.25 MB, B = 3.25 MB from t=0 (1.5 MB/s each); at t=1 A has 4.75 MB left, B 1.75.
    # C = 1 MB joins at t=1: 1 MB/s each. C ends at 2; then A has 3.75, B 0.75 left, 1.5 MB/s each:
    # B ends at 2.5; A has 3.0 left, alone at 3 MB/s: ends at 3.5. Latency 0.125 on top of each.
    env, net = shared(24e6, 3, latency_s=0.125)
    a, b = start(env, net, 0, 6.25 * MB), start(env, net, 1, 3.25 * MB)
    c = start(env, net, 2, 1 * MB, at=1.0)
    env.run(until=1.5)
    assert sorted(net.rates_bps().values()) == [8e6, 8e6, 8e6]
    env.run()
    assert c.value.end_at == 2.125 and c.value.start_at == 1.0
    assert b.value.end_at == 2.625
    assert a.value.end_at == 3.625


TWO_LINKS = """
[[network.nodes]]
name = "server"
kind = "server"
[[network.nodes]]
name = "r"
[[network.nodes]]
name = "ap2"
[[network.links]]
a = "r"
b = "server"
bandwidth_bps = 10e6
[[network.links]]
a = "ap2"
b = "r"
down_bps = 2e6
up_bps = 1e6
[network.classes.x]
attach = "r"
access = "none"
[network.classes.y]
attach = "ap2"
access = "none"
"""


def test_max_min_gives_the_unused_share_to_the_other_flow():
    # y crosses ap2-r (2 Mbit/s down) and r-server (10); x only r-server. Equal shares would give x 5;
    # max-min leaves y at its 2-Mbit/s bottleneck and gives x the remaining 8.
    env, net = network("[network]\n" + TWO_LINKS, {"x": 1, "y": 1})
    x, y = start(env, net, 0, MB), start(env, net, 1, MB)
    env.run(until=0.5)
    assert sorted(net.rates_bps().values()) == [2e6, 8e6]
    env.run()
    assert x.value.end_at == 1.0          # 8e6 bits at 8 Mbit/s
    assert y.value.end_at == 4.0          # 8e6 bits at 2 Mbit/s throughout
    # Alone, each would get its path's narrowest link (what an after_compute device plans with).
    topo = net.topology
    assert topo.nominal_rate_bps(np.array([0, 1]), Direction.DOWN).tolist() == [10e6, 2e6]
    assert topo.nominal_rate_bps(np.array([0, 1]), Direction.UP).tolist() == [10e6, 1e6]
    assert topo.route_of(1) == (1, 0)
    # Upload: ap2-r is 1 Mbit/s up, and the downlink flows of before do not matter.
    env, net = network("[network]\n" + TWO_LINKS, {"x": 1, "y": 1})
    up = start(env, net, 1, MB, direction=Direction.UP)
    down = start(env, net, 1, MB, direction=Direction.DOWN)
    env.run()
    assert up.value.end_at == 8.0 and down.value.end_at == 4.0


def test_max_min_rates_progressive_filling():
    # Classic example: resources 0 (cap 1), 1 (cap 2); flows: {0}, {0,1}, {1}, {1}.
    caps = {0: 1.0, 1: 2.0}
    rates = max_min_rates([(0,), (0, 1), (1,), (1,)], caps.__getitem__)
    assert rates == [0.5, 0.5, 0.75, 0.75]
    assert max_min_rates([()], caps.__getitem__) == [float("inf")]


def test_interrupting_a_flow_speeds_up_the_others():
    env, net = shared(8e6, 2)
    caught = []

    def victim():
        try:
            yield from transfer(env, net, 0, Direction.DOWN, MB)
        except simpy.Interrupt as exc:
            caught.append((env.now, exc.cause))

    v = env.process(victim())
    other = start(env, net, 1, MB)

    def churn():
        yield env.timeout(0.5)
        v.interrupt("offline")

    env.process(churn())
    env.run()
    assert caught == [(0.5, "offline")]
    # 0.25 MB sent by 0.5 s at C/2; the remaining 0.75 MB alone at 1 MB/s.
    assert other.value.end_at == 1.25
    assert net.n_active == 0


def test_until_at_cuts_a_late_transfer_and_frees_its_share():
    env, net = shared(8e6, 2, latency_s=0.25)
    late = start(env, net, 0, 4 * MB, until_at=1.5)
    other = start(env, net, 1, 2 * MB)
    env.run()
    assert not late.value.done and late.value.end_at == 1.5 and late.value.bytes_sent == 0.75 * MB
    assert late.value.bytes_end_at == 1.5 and other.value.bytes_end_at == 2.75
    # other: 0.75 MB by 1.5 s, then 1.25 MB alone: bytes end at 2.75, arrives at 3.0.
    assert other.value.done and other.value.end_at == 3.0
    # Bytes done by the deadline but their latency is not: not delivered, ends at the deadline.
    env, net = shared(8e6, 1, latency_s=0.25)
    p = start(env, net, 0, MB, until_at=1.125)
    env.run()
    assert not p.value.done and p.value.end_at == 1.125 and p.value.bytes_sent == MB and p.value.bytes_end_at == 1.0
    # Arriving exactly at the deadline counts.
    env, net = shared(8e6, 1, latency_s=0.25)
    p = start(env, net, 0, MB, until_at=1.25)
    env.run()
    assert p.value.done and p.value.end_at == 1.25


def test_star_preset_gives_independent_private_links():
    env, net = network("[network]\npreset = \"star\"", {"a": 2}, down_bps=np.array([8e6, 16e6]),
                       up_bps=np.array([1e6, 2e6]), latency_s=0.25)
    flows = [start(env, net, d, MB) for d in (0, 1)] + [start(env, net, d, MB, direction=Direction.UP) for d in (0, 1)]
    env.run()
    assert [p.value.end_at for p in flows] == [1.25, 0.75, 8.25, 4.25]
    assert net.topology.spec.preset is Preset.STAR


def test_shared_ap_preset_shares_within_a_class_and_on_the_backhaul():
    base = "[network]\npreset = \"shared_ap\"\nap_bandwidth_bps = 8e6\n"
    env, net = network(base, {"a": 2, "b": 1}, down_bps=1e12)
    flows = [start(env, net, d, MB) for d in range(3)]
    env.run()
    assert [p.value.end_at for p in flows] == [2.0, 2.0, 1.0]   # class a shares its AP; b is alone
    env, net = network(base + "backhaul_bandwidth_bps = 8e6\nbackhaul_latency_s = 0.5\n", {"a": 1, "b": 1},
                       down_bps=1e12)
    flows = [start(env, net, d, MB) for d in range(2)]
    env.run()
    assert [p.value.end_at for p in flows] == [2.5, 2.5]   # the backhaul is shared across classes


ROUTES = """
[network]
route_by = "{metric}"
[[network.nodes]]
name = "server"
kind = "server"
[[network.nodes]]
name = "a"
[[network.nodes]]
name = "b"
[[network.links]]
a = "a"
b = "server"
bandwidth_bps = 8e6
latency_s = 1.0
[[network.links]]
a = "a"
b = "b"
bandwidth_bps = 4e6
latency_s = 0.125
[[network.links]]
a = "b"
b = "server"
bandwidth_bps = 16e6
latency_s = 0.25
[network.classes.c]
attach = "a"
access = "none"
"""


@pytest.mark.parametrize("metric, end_at", [("latency", 2.0 + 0.375), ("hops", 1.0 + 1.0)])
def test_routes_follow_the_shortest_path(metric, end_at):
    env, net = network(ROUTES.format(metric=metric), {"c": 1})
    p = start(env, net, 0, MB)
    env.run()
    assert p.value.end_at == end_at


def test_shannon_rate_and_path_gain():
    # SNR = P g / (N0 B) = 0.3 * 1e-3 / (1e-10 * 1e6) = 3 -> B log2(4) = 2 B.
    assert shannon_rate_bps(1e6, 0.3, 1e-3, 1e-10) == pytest.approx(2e6, rel=1e-12)
    assert path_gain(20.0, reference_gain=1e-3, reference_distance_m=10.0, exponent=2.0) == pytest.approx(2.5e-4)
    assert path_gain(5.0, reference_gain=1e-3, reference_distance_m=10.0, exponent=2.0) == 1e-3   # clamped
    h2 = rayleigh_power_gain(np.random.default_rng(7), 200_000)
    assert h2.mean() == pytest.approx(1.0, abs=0.01) and h2.min() >= 0


WIRELESS = """
[network.classes.w]
access = "wireless"
bandwidth_hz = 1e6
up_tx_power_w = 0.3
down_tx_power_w = 0.3
distance_m = 20
reference_distance_m = 10
reference_gain = 4e-3
path_loss_exponent = 2
noise_psd_w_per_hz = 1e-10
fading = "{fading}"
"""


def test_wireless_access_link_uses_the_shannon_rate():
    # g = 4e-3 * (10/20)^2 = 1e-3: SNR 3, rate 2 Mbit/s; 1 MB takes 4 s.
    env, net = network(WIRELESS.format(fading="none"), {"w": 1})
    assert net.topology.access_bps[:, 0] == pytest.approx([2e6, 2e6], rel=1e-12)
    p = start(env, net, 0, MB)
    env.run()
    assert p.value.end_at == pytest.approx(4.0, rel=1e-12)
    # Rayleigh fading: a fresh |h|^2 per device per round, the same draw for both directions.
    env, net = network(WIRELESS.format(fading="rayleigh"), {"w": 3})
    rates = net.topology.access_rates_bps(np.arange(3), np.random.default_rng(1))
    h2 = np.random.default_rng(1).exponential(1.0, 3)
    assert rates[0] == pytest.approx(1e6 * np.log2(1 + 3 * h2), rel=1e-12)
    net.begin_round(np.arange(3), np.random.default_rng(1))
    assert net._access[1] == pytest.approx(rates[1])


def test_capacity_change_mid_transfer_reshares():
    env, net = network("", {"c": 1}, down_bps=8e6)
    p = start(env, net, 0, 2 * MB)

    def fade():
        yield env.timeout(1.0)
        net.set_access_bps(np.array([0]), np.array([[16e6], [8e6]]))

    env.process(fade())
    env.run()
    assert p.value.end_at == 1.5    # 1 MB in the first second, the second MB at 2 MB/s
    # A capacity of 0 stalls the flow until the capacity comes back.
    env, net = network("", {"c": 1}, down_bps=8e6)
    p = start(env, net, 0, 2 * MB)

    def outage():
        yield env.timeout(1.0)
        net.set_access_bps(np.array([0]), np.array([[0.0], [8e6]]))
        yield env.timeout(3.0)
        net.set_access_bps(np.array([0]), np.array([[8e6], [8e6]]))

    env.process(outage())
    env.run()
    assert p.value.end_at == 5.0
    with pytest.raises(FedsimError):
        net.set_access_bps(np.array([0]), np.array([[np.nan], [1.0]]))


def test_reader_errors_name_the_field():
    def error(text, classes=("phones",)):
        with pytest.raises(ScenarioError) as info:
            spec_of(text, list(classes))
        return info.value

    base = SHARED.format(c=8e6, lat=0)
    err = error(base.replace('b = "server"', 'b = "nowhere"'))
    assert err.field == "network.links[0].b" and "nowhere" in str(err) and err.source == "t.toml"
    assert error(base.replace('attach = "ap"', 'attach = "ap9"')).field == "network.classes.phones.attach"
    assert error(base.replace("bandwidth_bps = 8000000.0", "bandwidth_bps = 8e6\ndown_bps = 1e6")).field == \
        "network.links[0].bandwidth_bps"
    assert error(base.replace("bandwidth_bps = 8000000.0", "bandwidth_bps = -1")).field == \
        "network.links[0].bandwidth_bps"
    assert error(base, classes=("other",)).field == "network.classes.phones"   # unknown class
    assert error(base.replace('kind = "server"', 'kind = "router"')).field == "network.nodes"
    assert error("[network]\npreset = \"shared_ap\"\n").field == "network.ap_bandwidth_bps"
    assert error("[network]\npreset = \"shared_ap\"\nap_down_bps = 1e6\n").field == "network.ap_up_bps"
    assert error("[network]\n[network.classes.phones]\nattach = \"server\"\n").field == \
        "network.classes.phones.attach"
    disconnected = base + '[[network.nodes]]\nname = "island"\n[network.classes.other]\nattach = "island"\n'
    err = error(disconnected, classes=("phones", "other"))
    assert err.field == "network.classes.other.attach" and "no route" in str(err)
    assert error(base).field == "network.upload_mode"   # unknown unless the caller says it is its key
    spec = spec_of(base, ["phones"], ignore=("upload_mode",))
    assert spec.classes[0].access is AccessKind.NONE and spec.server == "server"


def test_transfer_argument_checks():
    env, net = shared(8e6, 1)
    with pytest.raises(FedsimError):
        env.run(start(env, net, 0, -1))
    with pytest.raises(FedsimError):
        next(transfer(simpy.Environment(), net, 0, Direction.DOWN, 1))
    p = start(env, net, 0, 0)
    env.run()
    assert p.value.done and p.value.end_at == 0.0


def _count_work(env, monkeypatch):
    """Record the delay of every timeout the network schedules and count its max-min computations (the
    general one and the one-route ones), by their number of flows."""
    import fedsim.world.network

    delays, shares = [], []
    timeout, rates = env.timeout, fedsim.world.network.max_min_rates
    one_route, share = fedsim.world.network.one_route_max_min_rates, fedsim.world.network.route_share
    env.timeout = lambda delay=0, value=None: (delays.append(delay), timeout(delay, value))[1]
    monkeypatch.setattr(fedsim.world.network, "max_min_rates",
                        lambda paths, capacity: (shares.append(len(paths)), rates(paths, capacity))[1])
    monkeypatch.setattr(fedsim.world.network, "one_route_max_min_rates",
                        lambda private, *route: (shares.append(len(private)), one_route(private, *route))[1])
    monkeypatch.setattr(fedsim.world.network, "route_share",
                        lambda route_bps, n: (shares.append(n), share(route_bps, n))[1])
    return delays, shares


def test_simultaneous_starts_share_once_and_keep_one_timer(monkeypatch):
    """2,000 equal flows on one link: the starts of one instant are shared in one max-min computation of
    8e6 / 2000 = 4,000 bit/s each, the group has one completion timer, and all end together at
    2000 * 8e3 bits / 8e6 bit/s = 2 s, with no computation more (a group whose flows are all done just ends)."""
    env, net = shared(8e6, 2000)
    delays, shares = _count_work(env, monkeypatch)
    flows = [start(env, net, d, 1000) for d in range(2000)]
    env.run(until=1.0)
    assert set(net.rates_bps().values()) == {4000.0} and net.n_active == 2000
    assert shares == [2000]
    assert [d for d in delays if d > 0] == [2.0]        # the one timer, of the first flow (by id) of the group
    env.run()
    assert {p.value.end_at for p in flows} == {2.0} and net.n_active == 0
    assert shares == [2000] and [d for d in delays if d > 0] == [2.0]


def test_flows_ending_one_by_one_reshare_once_per_end(monkeypatch):
    """n flows of sizes 1, 2, ..., n kB start together on one link of C bit/s: they end in size order, one at a
    time; flow k (0-based) ends when the n - j flows left after j ends have each sent 1 kB more, for j = 0..k:
    t_k = sum_{j<=k} (n - j) * 8e3 / C. Each end re-shares the others in one computation (n - 1 - k flows)
    and arms one timer: n computations and n timers in all, not one per flow and change."""
    n, capacity = 200, 8e6
    env, net = shared(capacity, n)
    delays, shares = _count_work(env, monkeypatch)
    flows = [start(env, net, d, 1000 * (d + 1)) for d in range(n)]
    env.run()
    expected = np.cumsum([(n - j) * 8e3 / capacity for j in range(n)])
    # n re-shares, each adding a few roundings of 2^-53 to the remaining sizes and times: well within 1e-12
    assert [p.value.end_at for p in flows] == pytest.approx(expected.tolist(), rel=1e-12)
    assert shares == list(range(n, 0, -1))
    assert len([d for d in delays if d > 0]) == n
