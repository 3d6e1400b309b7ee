"""Pure tensor math of normkit: partitions, statistics, operations, recovery. No state."""

from .partition import canonical_view as canonical_view
from .partition import resolve_groups as resolve_groups
from .partition import restore_view as restore_view
from .standardize import affine_transform as affine_transform
from .statistics import box_mean as box_mean
from .statistics import local_moments as local_moments
from .statistics import moments as moments

