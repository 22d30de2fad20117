"""The network against its reference (`tests/oracle_network.py`: a Python object per flow, the general
progressive filling over every flow of a group at every change), on random topologies and traffic.

Both run the same script of transfers, cuts, interruptions and capacity changes in their own SimPy
environment; every transfer's result and the rates at probe times must be equal, float for float.
"""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from fedsim.world.network import Direction, Network, build_topology, max_min_rates, transfer
from fedsim.world.sharing import one_route_max_min_rates, route_share
from tests.oracle_network import ReferenceNetwork
from tests.test_network import spec_of


def random_topology(rng: np.random.Generator):
    """A server, 1-5 routers or access points (a tree, sometimes with one more link), 1-4 classes attached
    to them with no private link, fleet links or Rayleigh-faded wireless links."""
    n_nodes = int(rng.integers(1, 6))
    lines = ['[network]\nroute_by = "hops"\n[[network.nodes]]\nname = "server"\nkind = "server"']
    for i in range(n_nodes):
        lines.append(f'[[network.nodes]]\nname = "n{i}"\nkind = "{rng.choice(["router", "ap"])}"')
    names = ["server"] + [f"n{i}" for i in range(n_nodes)]
    pairs = [(names[i + 1], names[int(rng.integers(0, i + 1))]) for i in range(n_nodes)]
    if n_nodes >= 3 and rng.random() < 0.5:
        a, b = rng.choice(np.arange(1, n_nodes + 1), 2, replace=False)
        if (names[a], names[b]) not in pairs and (names[b], names[a]) not in pairs:
            pairs.append((names[a], names[b]))
    for a, b in pairs:
        down, up = rng.choice([2e6, 4e6, 8e6, 1e7, 3e7], 2) * rng.uniform(0.5, 1.5, 2)
        lines.append(f'[[network.links]]\na = "{a}"\nb = "{b}"\ndown_bps = {float(down)!r}\nup_bps = {float(up)!r}')
    classes = [f"c{k}" for k in range(int(rng.integers(1, 5)))]
    for name in classes:
        access = rng.choice(["none", "fleet", "wireless"])
        text = f'[network.classes.{name}]\nattach = "{names[int(rng.integers(1, n_nodes + 1))]}"\naccess = "{access}"'
        if access == "wireless":
            text += ('\nbandwidth_hz = 1e6\nup_tx_power_w = 0.2\ndown_tx_power_w = 1.0\n'
                     'distance_m = { dist = "uniform", low = 10.0, high = 200.0 }\nfading = "rayleigh"')
        lines.append(text)
    spec = spec_of("\n".join(lines), classes)
    n = int(rng.integers(20, 120))
    class_of = np.sort(rng.integers(0, len(classes), n))
    return build_topology(spec, class_of=class_of, downlink_bps=rng.uniform(1e6, 2e7, n),
                          uplink_bps=rng.uniform(5e5, 5e6, n), latency_s=rng.uniform(0.0, 0.05, n),
                          rng=np.random.default_rng(int(rng.integers(1 << 30))))


def run_script(net_class, topology, seed: int, one_per_device: bool = False):
    """Transfers (some two at once per device and direction unless `one_per_device`, some with a deadline,
    some interrupted) and capacity changes, all drawn from `seed`; returns every transfer's (index, result)
    and probed rates."""
    rng = np.random.default_rng(seed)
    env = simpy.Environment()
    net = net_class(env, topology)
    n = topology.n_devices
    results, probes = [], []

    def one(k, device, direction, nbytes, at, until_at, stop_at):
        yield env.timeout(at)
        job = env.process(_transfer(env, net, device, direction, nbytes, until_at))
        if stop_at is not None:
            yield env.timeout(stop_at) | job
            if job.is_alive:
                job.interrupt("offline")
        result = yield job
        results.append((k, env.now, result))

    devices = rng.permutation(n) if one_per_device else rng.integers(0, n, 200)
    for k in range(min(int(rng.integers(30, 200)), len(devices))):
        device = int(devices[k])
        direction = Direction.DOWN if one_per_device or rng.random() < 0.6 else Direction.UP
        at = float(rng.choice([0.0, 0.5, rng.uniform(0, 4)]))
        until_at = at + float(rng.uniform(0.2, 5)) if rng.random() < 0.3 else None
        stop_at = float(rng.uniform(0, 3)) if rng.random() < 0.15 else None
        env.process(one(k, device, direction, float(rng.integers(1, 400)) * 1000.0, at, until_at, stop_at))

    def fading():
        for _ in range(3):
            yield env.timeout(float(rng.uniform(0.1, 2)))
            devices = rng.choice(n, int(rng.integers(1, n + 1)), replace=False)
            net.begin_round(devices, np.random.default_rng(int(rng.integers(1 << 30))))

    def probe():
        for t in np.sort(rng.uniform(0, 6, 8)):
            yield env.timeout(float(t) - env.now)
            probes.append((env.now, net.rates_bps(), net.n_active))

    env.process(fading())
    env.process(probe())
    env.run()
    assert net.n_active == 0
    return results, probes


def _transfer(env, net, device, direction, nbytes, until_at):
    try:
        return (yield from transfer(env, net, device, direction, nbytes, until_at=until_at))
    except simpy.Interrupt:
        return "interrupted"


@pytest.mark.parametrize("one_per_device", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_network_equals_the_reference_on_random_topologies(seed, one_per_device):
    """With two flows of one device in one direction, a group is re-shared by the general algorithm; with
    one, by the one-route or the several-routes numpy passes."""
    topology = random_topology(np.random.default_rng(seed))
    got = run_script(Network, topology, 1000 + seed, one_per_device)
    want = run_script(ReferenceNetwork, topology, 1000 + seed, one_per_device)
    assert len(got[0]) == len(want[0]) > 0
    assert got == want


def test_crowded_access_point_equals_the_reference():
    """1,000 flows on one access point, half of them behind slow private radios: the one-route path (sorted
    private capacities, then the link's share) gives the reference's results float for float."""
    spec = spec_of('[[network.nodes]]\nname = "server"\nkind = "server"\n[[network.nodes]]\nname = "ap"\n'
                   'kind = "ap"\n[[network.links]]\na = "ap"\nb = "server"\nbandwidth_bps = 1e8\n'
                   '[network.classes.a]\nattach = "ap"\naccess = "none"\n'
                   '[network.classes.b]\nattach = "ap"\naccess = "fleet"\n', ["a", "b"])
    rng = np.random.default_rng(5)
    n = 1000
    topology = build_topology(spec, class_of=np.repeat([0, 1], n // 2), downlink_bps=rng.uniform(2e4, 4e5, n),
                              uplink_bps=rng.uniform(2e4, 4e5, n), latency_s=np.zeros(n), rng=rng)

    def run(net_class):
        env = simpy.Environment()
        net = net_class(env, topology)
        out = []
        for d in range(n):
            job = env.process(transfer(env, net, d, Direction.DOWN, float(1000 * (1 + d % 37))))
            job.callbacks.append(lambda event, d=d: out.append((d, event.value)))
        env.run()
        return out

    assert run(Network) == run(ReferenceNetwork)


@pytest.mark.parametrize("seed", range(200))
def test_one_route_rates_equal_the_general_algorithm(seed):
    """Random private capacities (some equal, some 0, some absent) under 1-3 route resources."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 60)), int(rng.integers(1, 4))
    route = sorted(rng.choice(20, m, replace=False).tolist())
    route_bps = rng.choice([0.0, 1e6, 3e6, 1e7, np.inf], m, p=[0.05, 0.3, 0.3, 0.3, 0.05])
    private = rng.choice([0.0, 1e4, 5e4, 2e5, 1e6, np.inf], n) * rng.choice([1.0, rng.uniform(0.5, 2)], n)
    paths = [((100 + i,) if np.isfinite(private[i]) else ()) + tuple(route) for i in range(n)]
    capacity = {**{100 + i: float(private[i]) for i in range(n)}, **dict(zip(route, route_bps.tolist()))}
    want = max_min_rates(paths, capacity.__getitem__)
    assert one_route_max_min_rates(private, route_bps.tolist(), route).tolist() == want
    if np.isinf(private).all():
        assert route_share(route_bps.tolist(), n) == want[0]


@pytest.mark.parametrize("seed", range(300))
def test_routes_rates_equal_the_general_algorithm(seed):
    """Flows on 2-6 routes through a random tree of 1-6 route resources (shared prefixes towards the server),
    random private capacities (some equal, 0 or absent) and route capacities (some equal, 0 or inf)."""
    from fedsim.world.sharing import routes_max_min_rates

    rng = np.random.default_rng(seed)
    n_res = int(rng.integers(1, 7))
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n_res)]      # resource 0 is nearest the server
    routes = []
    for _ in range(int(rng.integers(2, 7))):
        r, route = int(rng.integers(0, n_res)), []
        while r >= 0:
            route.append(2 * r + 1)
            r = parent[r]
        routes.append(tuple(route))
    capacity = {2 * r + 1: float(c) for r, c in
                enumerate(rng.choice([0.0, 1e6, 2e6, 3e6, 1e7, np.inf], n_res, p=[0.03, 0.3, 0.2, 0.2, 0.24, 0.03]))}
    n = int(rng.integers(1, 80))
    route_of = rng.integers(0, len(routes), n)
    private = rng.choice([0.0, 1e4, 5e4, 2e5, 1e6, np.inf], n, p=[0.02, 0.2, 0.2, 0.2, 0.18, 0.2])
    private = private * rng.choice([1.0, rng.uniform(0.5, 2)], n)
    for i in range(n):
        capacity[100 + i] = float(private[i])
    paths = [((100 + i,) if np.isfinite(private[i]) else ()) + routes[route_of[i]] for i in range(n)]
    want = max_min_rates(paths, capacity.__getitem__)
    assert routes_max_min_rates(private, route_of, routes, capacity.__getitem__).tolist() == want
