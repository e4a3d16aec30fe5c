import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import (
    MAX_HOSTS,
    LabError,
    LabPlan,
    plan_lab,
)


def test_plan_names_and_addresses_are_distinct_and_deterministic():
    plan = plan_lab(6, "demo", "/tmp/x")
    assert plan == plan_lab(6, "demo", "/tmp/x")
    assert [h.name for h in plan.hosts] == ["h1", "h2", "h3", "h4", "h5", "h6"]
    for attr in ("netns", "ipv4", "ipv6", "site4", "site6", "config_dir", "run_dir"):
        values = [getattr(h, attr) for h in plan.hosts]
        assert len(set(values)) == len(values), attr
    h1 = plan.hosts[0]
    assert (h1.netns, h1.ipv4, h1.ipv6) == ("kw-demo-h1", "192.0.2.11", "2001:db8::11")
    assert (h1.site4, h1.site4_address, h1.site6_address) == (
        "10.1.0.0/24",
        "10.1.0.1",
        "fd00:1::1",
    )
    assert plan.switch_netns == "kw-demo-sw"
    assert h1.config_dir.startswith("/tmp/x/demo/h1/")


def test_plan_roundtrips_through_its_state_dict():
    plan = plan_lab(3)
    assert LabPlan.from_dict(plan.to_dict()) == plan


def test_largest_lab_fits_the_underlay():
    plan = plan_lab(MAX_HOSTS)
    assert plan.hosts[-1].ipv4 == "192.0.2.254"


@pytest.mark.parametrize("size", [0, -1, MAX_HOSTS + 1, "4", 2.0, True])
def test_bad_sizes_are_refused_with_the_range(size):
    with pytest.raises(LabError, match="lab size"):
        plan_lab(size)


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "waytoolongname", "a-b"])
def test_bad_names_are_refused(name):
    with pytest.raises(LabError, match="lab name"):
        plan_lab(2, name)
