"""Network size and cost: Table 3, hand-sized small networks and properties."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coscale.analysis.network import (
    PUBLISHED,
    CostModel,
    build,
    dragonfly,
    fat_tree2,
    fat_tree3,
    multi_plane_fat_tree,
    network_cost,
    networks_for,
    slim_fly,
)
from coscale.errors import ConfigError


def _decimals(value) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text else 0


@pytest.mark.parametrize("topology", list(PUBLISHED))
def test_table3_exactly(topology):
    endpoints, switches, links, cost_m, per_endpoint_k = PUBLISHED[topology]
    r = network_cost(topology, radix=64)
    assert (r["endpoints"], r["switches"], r["links"]) == (endpoints, switches, links)
    assert round(r["cost"] / 1e6) == cost_m
    assert round(r["cost_per_endpoint"] / 1e3, _decimals(per_endpoint_k)) == per_endpoint_k


def test_fat_tree_formulas_by_hand():
    ft2 = fat_tree2(4)  # 4 leaves (2 down, 2 up) + 2 spines
    assert (ft2.endpoints, ft2.switches, ft2.links) == (8, 6, 8)
    ft3 = fat_tree3(4)  # k^3/4, 5k^2/4, k^3/2
    assert (ft3.endpoints, ft3.switches, ft3.links) == (16, 20, 32)
    mpft = multi_plane_fat_tree(4, planes=3)
    assert (mpft.endpoints, mpft.switches, mpft.links) == (24, 18, 24)


def test_cost_by_hand():
    prices = CostModel(switch_port=1, copper_link=10, optical_link=100, long_optical_link=1000)
    # 6 switches x 4 ports + 8 optical links + 8 endpoint cables
    assert fat_tree2(4).cost(prices) == 6 * 4 + 8 * 100 + 8 * 10
    df = dragonfly(7)  # p = h = 2, a = 4, 7 groups: 42 local copper, 28 global links, 56 endpoints
    assert (df.endpoints, df.switches, df.copper_links, df.long_links) == (56, 28, 42, 28)
    assert df.cost(prices) == 28 * 7 + (42 + 56) * 10 + 28 * 1000


def test_slim_fly_hoffman_singleton():
    sf = slim_fly(11, q=5)  # MMS graph with q = 5: 50 switches of degree 7 (Hoffman-Singleton), p = 4
    assert (sf.switches, sf.endpoints, sf.links) == (50, 200, 175)


def test_slim_fly_q_choice_at_radix_64():
    assert "q=28" in slim_fly(64).detail
    assert "q=27" in slim_fly(64, prime_power_only=True).detail


def test_dragonfly_canonical_groups():
    df = dragonfly(64, groups=16 * 32 + 1)  # a*h + 1: one global link between every pair of groups
    assert df.long_links == 513 * 512 // 2


@given(st.sampled_from([8, 16, 32, 64, 128]), st.integers(1, 15))
def test_more_planes_never_fewer_endpoints(k, planes):
    assert multi_plane_fat_tree(k, planes + 1).endpoints >= multi_plane_fat_tree(k, planes).endpoints


def test_target_listing_cheapest_first():
    found = networks_for(20000, radix=64)
    names = [n.topology for n, _ in found]
    assert names == ["SF", "DF", "FT3"]
    costs = [c for _, c in found]
    assert costs == sorted(costs)
    assert networks_for(10**7, radix=64) == []


def test_editable_costs():
    base = build("FT2").cost()
    cheaper = build("FT2").cost(CostModel().with_overrides({"switch_port": 0.0}))
    assert cheaper == base - 96 * 64 * 922.0
    with pytest.raises(ConfigError, match="unknown cost"):
        CostModel().with_overrides({"gold": 1.0})


@pytest.mark.parametrize("call", [lambda: fat_tree2(0), lambda: fat_tree2(63), lambda: build("torus"),
                                  lambda: multi_plane_fat_tree(64, 0), lambda: slim_fly(64, q=30),
                                  lambda: dragonfly(64, p=20), lambda: networks_for(0),
                                  lambda: CostModel(switch_port=-1)])
def test_bad_input(call):
    with pytest.raises(ConfigError):
        call()
