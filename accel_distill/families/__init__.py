"""Model families. Each module registers itself with ``@register_family``."""

from accel_distill.families import cogvideox, ltx, wan, wan_i2v  # noqa: F401
