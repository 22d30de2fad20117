"""The `[network]` table: nodes, links, presets and per-class access (wired or wireless), validated.

Reading only; `fedsim.world.network` builds the topology and simulates transfers on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence


from fedsim.spec.distributions import Dist, read_dist
from fedsim.spec.fields import Fields

__all__ = [
    "Direction", "Preset", "RouteMetric", "NodeKind", "AccessKind", "Fading", "NodeSpec", "LinkSpec",
    "WirelessSpec", "ClassNetSpec", "TopologySpec", "read_network_spec", "routes",
]


class Direction(enum.Enum):
    DOWN = 0   # server -> device (model download)
    UP = 1     # device -> server (update upload)


class Preset(enum.Enum):
    STAR = "star"            # a private link per device straight to the server (the fleet's rates)
    SHARED_AP = "shared_ap"  # the devices of a class share one access point, then an optional backhaul
    CUSTOM = "custom"        # [[network.nodes]] and [[network.links]]


class RouteMetric(enum.Enum):
    LATENCY = "latency"   # least summed link latency (ties: networkx's deterministic search order)
    HOPS = "hops"         # fewest links


class NodeKind(enum.Enum):
    SERVER = "server"
    ROUTER = "router"
    AP = "ap"


class AccessKind(enum.Enum):
    FLEET = "fleet"         # private link at the device's fleet downlink_bps / uplink_bps
    WIRELESS = "wireless"   # private link at the Shannon rate of the device's channel
    NONE = "none"           # no private link: the device is limited by the shared links only


class Fading(enum.Enum):
    NONE = "none"
    RAYLEIGH = "rayleigh"   # |h|^2 ~ Exp(1), drawn per device per round


# -- the spec ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSpec:
    name: str
    kind: NodeKind


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    down_bps: float
    up_bps: float
    latency_s: float


@dataclass(frozen=True)
class WirelessSpec:
    bandwidth_hz: float
    up_tx_power_w: float        # the device's transmit power (uplink)
    down_tx_power_w: float      # the access point's transmit power (downlink)
    distance_m: Dist            # drawn once per device
    reference_distance_m: float
    reference_gain: float       # g0: power gain at the reference distance
    path_loss_exponent: float
    noise_psd_w_per_hz: float
    fading: Fading


@dataclass(frozen=True)
class ClassNetSpec:
    attach: str                 # node the device's access link ends at
    access: AccessKind
    wireless: WirelessSpec | None


@dataclass(frozen=True)
class TopologySpec:
    preset: Preset
    route_by: RouteMetric
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    classes: tuple[ClassNetSpec, ...]    # in fleet class order

    @property
    def server(self) -> str:
        return next(n.name for n in self.nodes if n.kind is NodeKind.SERVER)


def _read_capacity(f: Fields, prefix: str, required: bool) -> tuple[float, float] | None:
    """`{prefix}bandwidth_bps` for both directions, or `{prefix}down_bps` and `{prefix}up_bps`."""
    both, down, up = f"{prefix}bandwidth_bps", f"{prefix}down_bps", f"{prefix}up_bps"
    if f.has(both):
        if f.has(down) or f.has(up):
            raise f.error(both, f"give either {both} or {down} and {up}, not both")
        value = f.number(both, low=0.0, low_open=True)
        return value, value
    if f.has(down) or f.has(up) or required:
        if not (f.has(down) or f.has(up)):
            raise f.error(both, f"missing required field (or give {down} and {up})")
        return f.number(down, low=0.0, low_open=True), f.number(up, low=0.0, low_open=True)
    return None


def _read_custom(f: Fields) -> tuple[tuple[NodeSpec, ...], tuple[LinkSpec, ...]]:
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for i, nf in enumerate(f.sub_list("nodes")):
        node = NodeSpec(nf.string("name"), NodeKind(nf.choice("kind", [k.value for k in NodeKind], "router")))
        if node.name in seen:
            raise nf.error("name", f"duplicate node name {node.name!r}")
        nf.finish()
        nodes.append(node)
        seen.add(node.name)
    servers = [n.name for n in nodes if n.kind is NodeKind.SERVER]
    if len(servers) != 1:
        raise f.error("nodes", f"exactly one node must have kind = \"server\", got {len(servers)}")
    names = {n.name for n in nodes}
    links: list[LinkSpec] = []
    joined: set[frozenset[str]] = set()
    for lf in (f.sub_list("links") if f.raw("links", []) != [] else []):
        a, b = lf.string("a"), lf.string("b")
        for key, name in (("a", a), ("b", b)):
            if name not in names:
                known = sorted(names)
                listed = ", ".join(known[:10]) + (f", ... ({len(known)} nodes)" if len(known) > 10 else "")
                raise lf.error(key, f"unknown node {name!r} (nodes: {listed})")
        if a == b:
            raise lf.error("b", f"a link must join two different nodes, got {a!r} twice")
        if frozenset((a, b)) in joined:
            raise lf.error("b", f"duplicate link between {a!r} and {b!r}")
        joined.add(frozenset((a, b)))
        down, up = _read_capacity(lf, "", required=True)
        links.append(LinkSpec(a, b, down, up, lf.number("latency_s", 0.0, low=0.0)))
        lf.finish()
    return tuple(nodes), tuple(links)


def _read_shared_ap(f: Fields, class_names: Sequence[str]) -> tuple[tuple[NodeSpec, ...], tuple[LinkSpec, ...]]:
    ap_down, ap_up = _read_capacity(f, "ap_", required=True)
    ap_latency = f.number("ap_latency_s", 0.0, low=0.0)
    backhaul = _read_capacity(f, "backhaul_", required=False)
    hub = "server"
    nodes = [NodeSpec("server", NodeKind.SERVER)]
    links: list[LinkSpec] = []
    if backhaul is not None:
        hub = "gateway"   # every AP feeds one gateway; the backhaul is shared by all classes
        nodes.append(NodeSpec(hub, NodeKind.ROUTER))
        links.append(LinkSpec(hub, "server", *backhaul, f.number("backhaul_latency_s", 0.0, low=0.0)))
    for c in class_names:
        nodes.append(NodeSpec(f"ap:{c}", NodeKind.AP))
        links.append(LinkSpec(f"ap:{c}", hub, ap_down, ap_up, ap_latency))
    return tuple(nodes), tuple(links)


def _read_wireless(f: Fields) -> WirelessSpec:
    return WirelessSpec(
        bandwidth_hz=f.number("bandwidth_hz", low=0.0, low_open=True),
        up_tx_power_w=f.number("up_tx_power_w", low=0.0, low_open=True),
        down_tx_power_w=f.number("down_tx_power_w", low=0.0, low_open=True),
        distance_m=read_dist(f, "distance_m"),
        reference_distance_m=f.number("reference_distance_m", 1.0, low=0.0, low_open=True),
        reference_gain=f.number("reference_gain", 1e-3, low=0.0, low_open=True),   # -30 dB at 1 m
        path_loss_exponent=f.number("path_loss_exponent", 3.0, low=0.0, high=10.0),
        noise_psd_w_per_hz=f.number("noise_psd_w_per_hz", 3.98e-21, low=0.0, low_open=True),  # -174 dBm/Hz
        fading=Fading(f.choice("fading", [k.value for k in Fading], "rayleigh")),
    )


def read_network_spec(fields: Fields, class_names: Sequence[str], ignore: Iterable[str] = ()) -> TopologySpec:
    """Read the `[network]` table; keys in `ignore` belong to the caller (e.g. `upload_mode`).

    ```toml
    [network]
    preset = "custom"          # "star" (default; "custom" if nodes/links are given) | "shared_ap"
    route_by = "latency"       # or "hops"
    [[network.nodes]]
    name = "server"
    kind = "server"            # exactly one; others "router" (default) or "ap"
    [[network.nodes]]
    name = "ap1"
    kind = "ap"
    [[network.links]]
    a = "ap1"
    b = "server"
    bandwidth_bps = 1e8        # both directions, or down_bps = ... and up_bps = ...
    latency_s = 0.005
    [network.classes.phones]   # per fleet class, all optional
    attach = "ap1"             # custom only; default "server" (shared_ap: the class's own "ap:NAME")
    access = "wireless"        # "fleet" (default) | "wireless" | "none"
    bandwidth_hz = 1e6         # wireless fields: see WirelessSpec / _read_wireless for defaults
    up_tx_power_w = 0.2
    down_tx_power_w = 1.0
    distance_m = { dist = "uniform", low = 10, high = 500 }
    ```
    `preset = "shared_ap"` takes `ap_bandwidth_bps` (or `ap_down_bps`/`ap_up_bps`), `ap_latency_s` and
    optionally `backhaul_bandwidth_bps` (or `backhaul_down_bps`/`backhaul_up_bps`), `backhaul_latency_s`.
    """
    for key in ignore:
        fields.raw(key, None)
    custom = fields.has("nodes") or fields.has("links")
    preset = Preset(fields.choice("preset", [p.value for p in Preset], "custom" if custom else "star"))
    route_by = RouteMetric(fields.choice("route_by", [m.value for m in RouteMetric], "latency"))
    if preset is Preset.CUSTOM:
        nodes, links = _read_custom(fields)
    elif preset is Preset.SHARED_AP:
        nodes, links = _read_shared_ap(fields, class_names)
    else:
        nodes, links = (NodeSpec("server", NodeKind.SERVER),), ()
    server = next(n.name for n in nodes if n.kind is NodeKind.SERVER)
    reachable = routes(nodes, links, route_by)
    per_class = fields.sub("classes", default_empty=True)
    classes = []
    for c in class_names:
        cf = per_class.sub(c, default_empty=True)
        default_attach = f"ap:{c}" if preset is Preset.SHARED_AP else server
        if cf.has("attach") and preset is not Preset.CUSTOM:
            raise cf.error("attach", f"only a custom topology lets classes choose where they attach "
                                     f"(preset is {preset.value!r})")
        attach = cf.string("attach", default_attach)
        if attach not in reachable:
            known = {n.name for n in nodes}
            problem = "has no route to the server" if attach in known else "is not a node of the network"
            raise cf.error("attach", f"node {attach!r} {problem}")
        access = AccessKind(cf.choice("access", [k.value for k in AccessKind], "fleet"))
        wireless = _read_wireless(cf) if access is AccessKind.WIRELESS else None
        cf.finish()
        classes.append(ClassNetSpec(attach, access, wireless))
    per_class.finish()
    fields.finish()
    return TopologySpec(preset, route_by, nodes, links, tuple(classes))


def routes(nodes: Sequence[NodeSpec], links: Sequence[LinkSpec], metric: RouteMetric) -> dict[str, tuple[int, ...]]:
    """Link indices from each node that can reach the server to the server, along the shortest path."""
    server = next(n.name for n in nodes if n.kind is NodeKind.SERVER)
    if not links:               # a star: only the server is reachable, by the empty route
        return {server: ()}
    import networkx as nx       # imported when a network is routed: a quarter second off every start

    graph = nx.Graph()
    graph.add_nodes_from(n.name for n in nodes)
    for i, link in enumerate(links):
        graph.add_edge(link.a, link.b, index=i, latency_s=link.latency_s)
    if metric is RouteMetric.LATENCY:
        paths = nx.single_source_dijkstra_path(graph, server, weight="latency_s")
    else:
        paths = nx.single_source_shortest_path(graph, server)
    return {node: tuple(graph[u][v]["index"] for u, v in zip(path[::-1], path[-2::-1]))
            for node, path in paths.items()}
