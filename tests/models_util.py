"""The optional model libraries of the integration tests: timm, torchvision, transformers.

They are test-only dependencies, installed beside the CPU torch by ``.ci/install-integration``
(torchvision from the registry is a CUDA build; that script makes it import on the CPU torch).
A test that needs one must not silently pass without it:

* locally, where a library is missing, the test is **skipped** (the reason names the script);
* where ``NORMKIT_REQUIRE_MODELS`` is set to anything but ``""`` or ``"0"`` — ``.ci/run`` sets it
  after running the script — a missing library **fails** the test instead.

API (``tests/`` is on ``sys.path`` under pytest, as for ``cases`` and ``examples_util``)::

    from models_util import import_or_fail, require_models

    def test_resnet_converts():
        timm = import_or_fail("timm")            # the module, or skip / fail as above
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        ...

    def test_llama_block():
        (transformers,) = require_models("transformers")  # several names: a tuple, in order

    @pytest.mark.models("timm", "torchvision")   # checked before the test runs (tests/conftest.py)
    def test_something():                        # no names: timm, torchvision and transformers
        import timm

Build every model from its config (``pretrained=False``, ``LlamaConfig(...)``): nothing is
downloaded, no weights exist on CI.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["MODEL_LIBRARIES", "REQUIRE_ENV", "import_or_fail", "models_required", "require_models"]

MODEL_LIBRARIES = ("timm", "torchvision", "transformers")
REQUIRE_ENV = "NORMKIT_REQUIRE_MODELS"
_HOW = "install them with .ci/install-integration (in the active virtual environment)"


def models_required() -> bool:
    """Whether a missing model library fails (``NORMKIT_REQUIRE_MODELS`` set, not ``0``)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def import_or_fail(name: str) -> ModuleType:
    """Import ``name`` and return the module; where it is missing (or installed but fails to
    import, e.g. a torchvision built for another torch) skip the calling test, or fail it when
    :func:`models_required`."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or torchvision's op registration against another torch
        what = "is not installed" if isinstance(e, ModuleNotFoundError) else "fails to import"
        msg = f"{name} {what} ({type(e).__name__}: {e}); {_HOW}"
        if models_required():
            pytest.fail(f"{REQUIRE_ENV} is set, so integration tests must run: {msg}",
                        pytrace=False)
        pytest.skip(msg)


def require_models(*names: str) -> tuple[ModuleType, ...]:
    """:func:`import_or_fail` for each name (default: timm, torchvision, transformers), in order."""
    return tuple(import_or_fail(n) for n in (names or MODEL_LIBRARIES))
