"""The intervention methods, one module each, registered by name (``base.METHODS``): reward shaping,
filtering, inoculation, preventative steering and ablation (CAFT). A new method is one module with a
``@register``-ed ``Method`` subclass; import it before a plan or config names it."""
# isort: skip_file
# (importing the modules registers them; their order here is the order every list of methods shows)

from __future__ import annotations

from . import reward_shaping  # noqa: F401
from . import filter  # noqa: F401
from . import inoculate  # noqa: F401
from . import steer  # noqa: F401
from . import ablate  # noqa: F401
from .base import METHODS, Method, method, method_variant, register, variants
from .inoculate import with_instruction

__all__ = ["METHODS", "Method", "method", "method_variant", "register", "variants", "with_instruction"]
