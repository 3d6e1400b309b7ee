"""Named methods: registered presets of :class:`normkit.Normalization`, one family per file.

Every preset class listed in its family module's ``__all__`` is exported here and from
:mod:`normkit` (star imports over those lists, so a new preset in an existing family file needs
no export line; ``tests/test_catalog.py`` checks that every registered class is exported).
"""

from . import (
    combination,
    conditional,
    ibn,
    local,
    multimode,
    online,
    power,
    robust,
    scaling,
    standard,
    whitening,
)
from .combination import *  # noqa: F403
from .conditional import *  # noqa: F403
from .ibn import *  # noqa: F403
from .local import *  # noqa: F403
from .multimode import *  # noqa: F403
from .online import *  # noqa: F403
from .power import *  # noqa: F403
from .robust import *  # noqa: F403
from .scaling import *  # noqa: F403
from .standard import *  # noqa: F403
from .whitening import *  # noqa: F403

__all__: list[str] = []
__all__ += combination.__all__
__all__ += conditional.__all__
__all__ += ibn.__all__
__all__ += local.__all__
__all__ += multimode.__all__
__all__ += online.__all__
__all__ += power.__all__
__all__ += robust.__all__
__all__ += scaling.__all__
__all__ += standard.__all__
__all__ += whitening.__all__
