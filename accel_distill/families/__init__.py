"""Model families. Each module registers itself with ``@register_family``."""

from accel_distill.families import wan  # noqa: F401
