"""How many groups a GroupNorm gets.

Rule (documented in the README): an explicit ``num_groups`` or ``group_size`` must divide the
channel count, else a ``ValueError`` naming the layer. Without either, G is the largest
divisor of C that is at most 32 *and* leaves at least 2 channels per group, so the default
never silently turns GroupNorm into InstanceNorm (G = C); C = 1 gets G = 1.
"""
from __future__ import annotations

DEFAULT_MAX_GROUPS = 32


def default_groups(num_channels: int, max_groups: int = DEFAULT_MAX_GROUPS) -> int:
    """Largest G ≤ max_groups dividing C with C/G ≥ 2 (1 when C < 2)."""
    for g in range(min(max_groups, num_channels // 2), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def resolve_groups(num_channels: int, num_groups: int | None = None, group_size: int | None = None,
                   where: str = "this layer") -> int:
    """The group count for a layer with ``num_channels`` channels (see module docstring)."""
    if num_groups is not None and group_size is not None:
        raise ValueError("give num_groups or group_size, not both")
    if num_groups is not None:
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups={num_groups!r} does not divide the {num_channels} channels of "
                f"'{where}'. Use group_size=, leave num_groups unset for the default rule, or set "
                f"this layer apart with overrides={{'{where}': {{'num_groups': ...}}}} / exclude=")
        return num_groups
    if group_size is not None:
        if not isinstance(group_size, int) or group_size < 1 or num_channels % group_size:
            raise ValueError(
                f"group_size={group_size!r} does not divide the {num_channels} channels of "
                f"'{where}'. Use num_groups=, the default rule, or overrides= for this layer")
        return num_channels // group_size
    return default_groups(num_channels)
