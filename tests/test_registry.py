"""Registry: names, aliases, spec strings, partials, errors, families and the ``norm_layer=``
drop-in contract of every registered class."""

from __future__ import annotations

import functools
import inspect
import re

import pytest
import torch

import normkit as nk
from cases import CASES

# Derived, not hand lists: the case table (tests/cases.py) names every method it tests, and a
# method is a drop-in norm layer when ``Cls(C)`` builds without options and needs no condition.
ALL = sorted({c.method for c in CASES})


def _is_drop_in(name: str) -> bool:
    try:
        module = nk.create(name, 8)
    except (TypeError, ValueError):  # needs options (e.g. cbn's num_classes, spade's label_nc)
        return False
    return not getattr(getattr(module, "nrr", None), "needs_condition", False)


DROP_IN = [n for n in ALL if _is_drop_in(n)]


def test_list_methods_is_exactly_the_catalog():
    # the registry and the case table name the same methods (a registered method without a row,
    # or a row of an unregistered method, fails here and in test_generic)
    assert nk.list_methods() == ALL
    # the derived drop-in list holds the plain layers and the self-conditioned ones, not those
    # that need a condition or options
    assert {"bn", "gn", "dbn", "iebn", "ilm"} <= set(DROP_IN)
    assert not {"cbn", "cin", "adain", "spade"} & set(DROP_IN)


def test_list_methods_by_family():
    std = nk.list_methods(family="standardization")
    assert std == sorted(std) and "bn" in std and "gn" in std and "dbn" not in std
    assert all(nk.info(n).family == "standardization" for n in std)
    fams = nk.list_families()
    assert fams == sorted(fams) and "standardization" in fams
    # every method belongs to exactly one listed family
    union = sorted(n for f in fams for n in nk.list_methods(family=f))
    assert union == nk.list_methods()


def test_unknown_family_raises_listing_known_ones():
    with pytest.raises(nk.ConfigError, match=r"unknown family 'whitening_xyz'.*standardization"):
        nk.list_methods(family="whitening_xyz")


@pytest.mark.parametrize("spelling", ["Batch-Norm", "batch_norm", "BATCHNORM", "bn", "B_N", "batch norm"])
def test_names_ignore_case_dash_underscore(spelling):
    m = nk.create(spelling, 4)
    assert type(m) is nk.BatchNorm and m.num_features == 4


@pytest.mark.parametrize(
    "alias,cls",
    [("center_norm", nk.MeanOnlyBatchNorm), ("group-norm", nk.GroupNorm), ("LayerNorm2d", nk.LayerNorm),
     ("instance_norm", nk.InstanceNorm), ("bgn", nk.BatchGroupNorm), ("pono", nk.PositionalNorm),
     ("RMSNorm", nk.RMSNorm), ("linf_bn", nk.RangeBatchNorm), ("local_response_norm", nk.LocalResponseNorm)],
)
def test_aliases(alias, cls):
    assert nk.get(alias) is cls
    assert nk.info(alias).cls is cls


def test_info_fields():
    info = nk.info("Group_Norm")
    assert info.name == "gn" and info.cls is nk.GroupNorm and info.family == "standardization"
    assert "group_norm" in info.aliases
    assert info.summary == ("Group normalization: standardize each sample over groups of `C/g` "
                            "channels and positions.")


def test_spec_string():
    m = nk.create("gn:num_groups=2", 8)
    assert type(m) is nk.GroupNorm and m.num_groups == 2
    m = nk.create("bn:eps=1e-3,momentum=None,affine=False", 8)
    assert m.eps == 1e-3 and m.momentum is None and not m.affine
    # explicit keyword arguments override those of the spec
    assert nk.create("gn:num_groups=2", 8, num_groups=4).num_groups == 4
    assert nk.parse_spec(" gn : num_groups = 8 , eps=1e-5 ") == ("gn", {"num_groups": 8, "eps": 1e-5})
    assert nk.parse_spec("ln") == ("ln", {})
    assert nk.parse_spec("ln:over=channels") == ("ln", {"over": "channels"})


@pytest.mark.parametrize("spec", ["gn:num_groups", "gn:=2", "gn:2=3", "gn:num_groups=2,eps"])
def test_bad_spec_raises_config_error(spec):
    with pytest.raises(nk.ConfigError, match=re.escape(repr(spec))):
        nk.get(spec)
    with pytest.raises(ValueError):
        nk.create(spec, 8)


def test_partial_is_keyword_only_functools_partial():
    p = nk.partial("gn", num_groups=2)
    assert isinstance(p, functools.partial)
    assert p.func is nk.GroupNorm and p.args == () and p.keywords == {"num_groups": 2}
    m = p(6)
    assert type(m) is nk.GroupNorm and m.num_groups == 2 and m.num_features == 6
    # model libraries rebind keywords of the partial
    p2 = functools.partial(p.func, **{**p.keywords, "num_groups": 3})
    assert p2(6).num_groups == 3
    # a spec string's keywords are merged, explicit ones win
    p3 = nk.partial("gn:num_groups=2,eps=1e-3", num_groups=3)
    assert p3.func is nk.GroupNorm and p3.args == () and p3.keywords == {"num_groups": 3, "eps": 1e-3}
    assert nk.partial(nk.BatchNorm, momentum=0.01)(5).momentum == 0.01


def test_partial_as_norm_layer_in_a_model():
    norm_layer = nk.partial("bn", eps=1e-3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), norm_layer(8), torch.nn.ReLU())
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    assert model[1].eps == 1e-3


def test_get_none_and_passthrough():
    assert nk.get(None) is None
    assert nk.get(nk.GroupNorm) is nk.GroupNorm
    p = functools.partial(nk.GroupNorm, num_groups=2)
    assert nk.get(p) is p
    assert nk.get("bn") is nk.BatchNorm


def test_get_wrong_type_raises():
    with pytest.raises(nk.ConfigError, match="int"):
        nk.get(3)
    with pytest.raises(nk.ConfigError, match="None"):
        nk.create(None, 4)
    with pytest.raises(nk.ConfigError):
        nk.partial(None)


@pytest.mark.parametrize("name,closest", [("bnn", "bn"), ("group_nrom", "gn"), ("layer-nrom", "ln"),
                                          ("rmsnrom", "rms_norm"), ("Instance_Nrom", "in")])
def test_unknown_name_suggests_closest(name, closest):
    with pytest.raises(nk.UnknownMethodError) as info:
        nk.create(name, 4)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, KeyError) and isinstance(err, nk.NormkitError)
    msg = str(err)
    assert repr(name) in msg
    assert re.search(r"did you mean .*" + re.escape(repr(closest)), msg), msg


def test_unknown_name_without_close_match_still_names_it():
    with pytest.raises(KeyError, match=r"'zzzzzzzzqqq'.*list_methods"):
        nk.get("zzzzzzzzqqq")
    with pytest.raises(ValueError):
        nk.info("zzzzzzzzqqq")


@pytest.fixture
def restore_registry():
    """Put the registry back as it was, whatever a registration test did to it."""
    methods, keys = dict(nk.registry._METHODS), dict(nk.registry._KEYS)
    yield
    nk.registry._METHODS.clear()
    nk.registry._METHODS.update(methods)
    nk.registry._KEYS.clear()
    nk.registry._KEYS.update(keys)


def test_register_rejects_a_taken_name(restore_registry):
    with pytest.raises(nk.ConfigError, match="already registered"):

        @nk.registry.register("Batch_Norm", family="standardization")
        class Other(nk.Normalization):
            """Not a real method."""

    assert nk.get("bn") is nk.BatchNorm
    assert nk.list_methods() == sorted(ALL)


def test_failed_register_leaves_registry_unchanged(restore_registry):
    # A registration whose alias is taken must not half-register the new name.
    with pytest.raises(nk.ConfigError, match="already registered"):

        @nk.registry.register("brand_new_method_xyz", family="standardization", aliases=("bn",))
        class Other(nk.Normalization):
            """Not a real method."""

    assert nk.list_methods() == sorted(ALL)
    with pytest.raises(nk.UnknownMethodError):
        nk.get("brand_new_method_xyz")


@pytest.mark.parametrize("name", DROP_IN)
def test_exported_and_norm_layer_contract(name):
    cls = nk.get(name)
    assert getattr(nk, cls.__name__) is cls
    assert issubclass(cls, torch.nn.Module)
    sig = inspect.signature(cls)
    params = list(sig.parameters.values())
    assert params[0].name == "num_features" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:]), sig
    for c in (32, 64, 48):  # grouped methods default to gcd(C, 32) groups / divisors ≤ 16
        m = cls(c)
        assert m.num_features == c
        y = m(torch.randn(4, c, 3, 3))
        assert y.shape == (4, c, 3, 3)
    m = cls(32, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in m.parameters())
    assert m(torch.randn(2, 32, 3, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError):
        cls(32, 4)  # everything after num_features is keyword-only


@pytest.mark.parametrize("name", ALL)
def test_docstring_has_shape_example_and_paper(name):
    cls = nk.get(name)
    doc = inspect.getdoc(cls)
    assert doc and "Shape" in doc and "Example" in doc
    assert re.search(r"arXiv:\d{4}\.\d{4,5}|\b(19|20)\d\d\b", doc), doc[:200]
    paper = nk.info(name).paper
    assert re.search(r"\b(19|20)\d\d\b", paper), paper
