"""One group-size policy for every grouped method (``normkit.methods._common.default_grouping``):
the default is the paper's value where it divides ``C``, else the largest valid value below it —
``gcd(C, 32)`` groups for standardization groups, the largest divisor of ``C`` up to 16 for
whitening groups. An explicit value is used exactly as given."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import normkit as nk
from normkit.methods._common import GN_GROUPS, WHITENING_GROUP, default_grouping

CHANNELS = (48, 64, 24, 7)

# method: (the parameter its default sets, the paper's value, is it a group count);
# "C" is the channel count itself (WCT whitens all channels), always valid.
POLICY = {
    "gn": ("num_groups", GN_GROUPS, True),
    "batch_group_norm": ("num_groups", GN_GROUPS, True),
    "ilm": ("num_groups", GN_GROUPS, True),
    "evonorm_s0": ("num_groups", GN_GROUPS, True),
    "bcn": ("num_groups", GN_GROUPS, True),
    "lcn": ("num_groups", 1, True),
    "dbn": ("group_size", WHITENING_GROUP, False),
    "pca_bw": ("group_size", WHITENING_GROUP, False),
    "cd_bw": ("group_size", WHITENING_GROUP, False),
    "iternorm": ("group_size", WHITENING_GROUP, False),
    "switchable_whitening": ("group_size", WHITENING_GROUP, False),
    "group_whitening": ("num_groups", WHITENING_GROUP, False),
    "instance_whitening": ("group_size", "C", False),
}


def _grouped_methods() -> list[str]:
    out = []
    for name in nk.list_methods():
        params = inspect.signature(nk.info(name).cls).parameters
        if "num_groups" in params or "group_size" in params:
            out.append(name)
    return out


def _grouping(module: torch.nn.Module, param: str) -> int:
    if param == "num_groups":
        value = getattr(module, "num_groups", None)
        return int(value if value is not None else module.groups[0])
    return int(module.groups[1])


def test_every_grouped_method_has_a_policy_row() -> None:
    assert sorted(POLICY) == _grouped_methods(), (
        "a registered method with num_groups=/group_size= needs its row here (and its default "
        "from normkit.methods._common.default_grouping)")


def test_default_grouping_rule() -> None:
    for c in range(1, 130):
        g = default_grouping(c, 32, count=True)
        assert g == math.gcd(c, 32) and c % g == 0 and 32 % g == 0
        d = default_grouping(c, 16, count=False)
        assert c % d == 0 and d <= 16 and not any(c % e == 0 for e in range(d + 1, 17))
    assert default_grouping(64, 32, count=True) == 32  # the paper's value where it divides
    with pytest.raises(nk.ConfigError, match="positive int"):
        default_grouping(0, 32, count=True)


@pytest.mark.parametrize("name", sorted(POLICY))
@pytest.mark.parametrize("c", CHANNELS)
def test_default_follows_the_policy(name: str, c: int) -> None:
    param, paper, count = POLICY[name]
    m = nk.create(name, c)
    expected = default_grouping(c, c if paper == "C" else paper, count=count)
    assert _grouping(m, param) == expected
    x = torch.randn(4, c, 2, 2)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(POLICY))
def test_explicit_value_is_exact(name: str) -> None:
    param, _, _ = POLICY[name]
    assert _grouping(nk.create(name, 48, **{param: 4}), param) == 4
    if param == "num_groups":  # does not divide 48: raises, never rounded to a valid value
        with pytest.raises(nk.ConfigError, match=r"48.*5|5.*48"):
            nk.create(name, 48, num_groups=5)


def test_gn_default_works_where_32_does_not_divide() -> None:
    # formerly a fixed 32 groups: create("gn", 48) raised
    x = torch.randn(2, 48, 3, 3)
    ref = torch.nn.GroupNorm(16, 48)
    assert torch.allclose(nk.create("gn", 48)(x), ref(x), atol=1e-5)
