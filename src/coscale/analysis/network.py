"""Size and cost of cluster networks built from switches of radix ``k`` (the paper's Table 3).

Topologies (``links`` counts switch-to-switch links; every endpoint also has one cable to its switch):
- FT2, two-layer fat-tree: k leaves with k/2 ports down and k/2 up, k/2 spines:
  k^2/2 endpoints, 3k/2 switches, k^2/2 links.
- MPFT, multi-plane fat-tree: ``planes`` independent FT2s, each GPU-NIC pair in one plane (8 in the
  paper): planes x the FT2 counts.
- FT3, three-layer fat-tree: k^3/4 endpoints, 5k^2/4 switches, k^3/2 links.
- MRFT, multi-rail fat-tree: one fabric whose leaves are aligned with the NIC rails (NIC i of every
  node on the leaves of rail i); cross-rail traffic stays in the network. Two layers: the FT2 counts.
- SF, Slim Fly (MMS graph): 2q^2 switches of network radix k' = (3q - delta)/2 with q = 4w + delta,
  delta in {-1, 0, 1}; p = ceil(k'/2) endpoints per switch; q is the largest with k' + p <= k.
  For k = 64 that is q = 28 (k' = 42, p = 21), as in the paper; 28 is not a prime power, so no MMS graph
  of that size exists (``prime_power_only=True`` gives q = 27).
- DF, Dragonfly with a = 2h = 2p (p endpoints, a - 1 local and h global ports per switch): groups of
  a switches, ``groups`` groups, a*(a-1)/2 local links per group, a*h*groups/2 global links. For k = 64:
  p = h = 16, a = 32. The paper's 261,632 endpoints are 511 = a*h - 1 groups (our default); the largest
  balanced Dragonfly has a*h + 1 = 513.

Cost model: the paper cites the Slim Fly paper's model without its unit prices. :class:`CostModel`
prices a switch by its ports and a cable by its kind: short copper (endpoint cables, Dragonfly local
links), optical (fat-tree and Slim Fly switch links) and long optical (Dragonfly global links). The
default prices are ours, fitted so that every cost in Table 3 rounds to the published digits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from coscale.analysis.table import Table
from coscale.errors import ConfigError

TOPOLOGIES = ("FT2", "MPFT", "FT3", "MRFT", "SF", "DF")

# Table 3 as published (radix 64): endpoints, switches, links, cost [M$], cost per endpoint [k$].
PUBLISHED = {
    "FT2": (2048, 96, 2048, 9, 4.39),
    "MPFT": (16384, 768, 16384, 72, 4.39),
    "FT3": (65536, 5120, 131072, 491, 7.5),
    "SF": (32928, 1568, 32928, 146, 4.4),
    "DF": (261632, 16352, 384272, 1522, 5.8),
}


@dataclass(frozen=True)
class CostModel:
    """Unit prices in US dollars (editable; defaults fitted to Table 3, see the module docstring)."""

    switch_port: float = 922.0  # per switch port: a 64-port switch is $59,008
    copper_link: float = 365.0  # endpoint-to-switch cable, Dragonfly local link
    optical_link: float = 1260.0  # fat-tree / Slim Fly switch-to-switch link (two transceivers + fibre)
    long_optical_link: float = 2822.0  # Dragonfly global link between groups

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0 <= value < math.inf:
                raise ConfigError(f"cost {name} must be a finite number >= 0, got {value}")

    def with_overrides(self, overrides: dict[str, float]) -> CostModel:
        unknown = sorted(set(overrides) - set(asdict(self)))
        if unknown:
            raise ConfigError(f"unknown cost key(s) {', '.join(map(repr, unknown))}; "
                              f"expected {', '.join(asdict(self))}")
        return replace(self, **overrides)


@dataclass(frozen=True)
class Network:
    topology: str
    radix: int
    endpoints: int
    switches: int
    optical_links: int = 0
    copper_links: int = 0  # switch-to-switch copper links (not endpoint cables)
    long_links: int = 0
    detail: str = ""

    @property
    def links(self) -> int:
        """Switch-to-switch links (Table 3's "links")."""
        return self.optical_links + self.copper_links + self.long_links

    def cost(self, prices: CostModel | None = None) -> float:
        """Dollars: switches by ports, switch links by kind, one copper cable per endpoint."""
        c = prices or CostModel()
        return (self.switches * self.radix * c.switch_port + self.optical_links * c.optical_link
                + (self.copper_links + self.endpoints) * c.copper_link
                + self.long_links * c.long_optical_link)

    def cost_per_endpoint(self, prices: CostModel | None = None) -> float:
        return self.cost(prices) / self.endpoints


def _check_radix(k: int, even_by: int = 2) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 4 or k % even_by:
        raise ConfigError(f"switch radix must be an integer >= 4 divisible by {even_by}, got {k!r}")


def fat_tree2(k: int) -> Network:
    _check_radix(k)
    return Network("FT2", k, k * k // 2, 3 * k // 2, optical_links=k * k // 2)


def multi_plane_fat_tree(k: int, planes: int = 8) -> Network:
    if planes < 1:
        raise ConfigError(f"planes must be at least 1, got {planes}")
    one = fat_tree2(k)
    return Network("MPFT", k, planes * one.endpoints, planes * one.switches,
                   optical_links=planes * one.optical_links, detail=f"{planes} planes of FT2")


def fat_tree3(k: int) -> Network:
    _check_radix(k)
    return Network("FT3", k, k**3 // 4, 5 * k * k // 4, optical_links=k**3 // 2)


def multi_rail_fat_tree(k: int, rails: int = 8) -> Network:
    if rails < 1:
        raise ConfigError(f"rails must be at least 1, got {rails}")
    one = fat_tree2(k)
    return replace(one, topology="MRFT", detail=f"{rails} rails on one two-layer fabric")


def _is_prime_power(q: int) -> bool:
    for p in range(2, q + 1):
        if q % p == 0:
            while q % p == 0:
                q //= p
            return q == 1
    return False


def slim_fly(k: int, q: int | None = None, prime_power_only: bool = False) -> Network:
    """Slim Fly sized by the MMS formulas; ``q`` defaults to the largest that fits radix ``k``."""
    _check_radix(k, 1)

    def shape(q: int) -> tuple[int, int]:
        delta = {0: 0, 1: 1, 3: -1}[q % 4]
        k_net = (3 * q - delta) // 2
        return k_net, math.ceil(k_net / 2)

    if q is None:
        fits = [c for c in range(3, k + 1) if c % 4 != 2 and sum(shape(c)) <= k
                and (_is_prime_power(c) or not prime_power_only)]
        if not fits:
            raise ConfigError(f"no Slim Fly fits switch radix {k}")
        q = max(fits)
    if q < 3 or q % 4 == 2:
        raise ConfigError(f"Slim Fly q must be >= 3 and of the form 4w + delta, delta in -1, 0, 1; got {q}")
    k_net, p = shape(q)
    if k_net + p > k:
        raise ConfigError(f"Slim Fly q={q} needs radix {k_net + p} > {k}")
    switches = 2 * q * q
    return Network("SF", k, p * switches, switches, optical_links=switches * k_net // 2,
                   detail=f"q={q}, k'={k_net}, p={p}" + ("" if _is_prime_power(q) else ", q not a prime power"))


def dragonfly(k: int, p: int | None = None, groups: int | None = None) -> Network:
    """Dragonfly with a = 2h = 2p; ``groups`` defaults to a*h - 1 (the paper's count)."""
    _check_radix(k, 1)
    p = (k + 1) // 4 if p is None else p
    h, a = p, 2 * p
    if p < 1 or p + a - 1 + h > k:
        raise ConfigError(f"Dragonfly p={p} needs radix {4 * p - 1} > {k}")
    groups = a * h - 1 if groups is None else groups
    if not 2 <= groups <= a * h + 1:
        raise ConfigError(f"Dragonfly groups must be between 2 and a*h + 1 = {a * h + 1}, got {groups}")
    switches = a * groups
    return Network("DF", k, p * switches, switches, copper_links=groups * a * (a - 1) // 2,
                   long_links=groups * a * h // 2, detail=f"p=h={p}, a={a}, {groups} groups")


def build(topology: str, radix: int = 64, planes: int = 8) -> Network:
    """One topology by its Table 3 name at radix ``radix`` (``planes`` for MPFT and MRFT)."""
    name = topology.upper()
    builders = {
        "FT2": lambda: fat_tree2(radix), "MPFT": lambda: multi_plane_fat_tree(radix, planes),
        "FT3": lambda: fat_tree3(radix), "MRFT": lambda: multi_rail_fat_tree(radix, planes),
        "SF": lambda: slim_fly(radix), "DF": lambda: dragonfly(radix),
    }
    if name not in builders:
        raise ConfigError(f"unknown topology {topology!r}; choose one of: {', '.join(TOPOLOGIES)}")
    return builders[name]()


def network_cost(topology: str, radix: int = 64, prices: CostModel | None = None,
                 planes: int = 8) -> dict:
    """Endpoints, switches, links, cost [$] and cost per endpoint [$] of one topology."""
    n = build(topology, radix, planes)
    return {"topology": n.topology, "radix": radix, "endpoints": n.endpoints, "switches": n.switches,
            "links": n.links, "cost": n.cost(prices), "cost_per_endpoint": n.cost_per_endpoint(prices),
            "detail": n.detail}


def networks_for(target_endpoints: int, radix: int = 64, prices: CostModel | None = None,
                 planes: int = 8) -> list[tuple[Network, float]]:
    """Topologies whose full size reaches ``target_endpoints``, cheapest first, with the estimated cost
    of ``target_endpoints`` endpoints (the full network's cost per endpoint x target)."""
    if target_endpoints < 1:
        raise ConfigError(f"target GPU count must be at least 1, got {target_endpoints}")
    found = [build(t, radix, planes) for t in TOPOLOGIES]
    reach = [(n, n.cost_per_endpoint(prices) * target_endpoints) for n in found
             if n.endpoints >= target_endpoints]
    return sorted(reach, key=lambda pair: pair[1])


def network_table(radix: int = 64, prices: CostModel | None = None, planes: int = 8,
                  topologies: tuple[str, ...] = TOPOLOGIES) -> Table:
    rows = []
    for t in topologies:
        n = build(t, radix, planes)
        published = PUBLISHED.get(n.topology) if radix == 64 and planes == 8 and prices is None else None
        rows.append([n.topology, n.endpoints, n.switches, n.links, n.cost(prices) / 1e6,
                     n.cost_per_endpoint(prices) / 1e3,
                     published[3] if published else None, published[4] if published else None, n.detail])
    c = prices or CostModel()
    notes = [f"radix {radix}; links are switch-to-switch; costs: ${c.switch_port:g} per switch port, "
             f"${c.copper_link:g} per copper cable (endpoints, DF local), ${c.optical_link:g} per optical "
             f"link, ${c.long_optical_link:g} per DF global link (fitted to Table 3; editable)."]
    return Table(
        title=f"Network topologies (radix {radix})",
        columns=["topology", "endpoints", "switches", "links", "cost [M$]", "cost/endpoint [k$]",
                 "paper [M$]", "paper [k$]", "construction"],
        rows=rows, formats=["", ",", ",", ",", ".0f", ".2f", "", "", ""], notes=notes,
    )


def target_table(target_endpoints: int, radix: int = 64, prices: CostModel | None = None,
                 planes: int = 8) -> Table:
    rows = [[n.topology, n.endpoints, cost / 1e6, n.cost_per_endpoint(prices) / 1e3]
            for n, cost in networks_for(target_endpoints, radix, prices, planes)]
    return Table(
        title=f"Topologies reaching {target_endpoints:,} endpoints (radix {radix}), cheapest first",
        columns=["topology", "max endpoints", f"cost of {target_endpoints:,} [M$]", "cost/endpoint [k$]"],
        rows=rows, formats=["", ",", ".1f", ".2f"],
        notes=["cost scaled from the full-size network's cost per endpoint."]
        + ([] if rows else ["no topology reaches this size at this radix; try a larger --radix."]),
    )
