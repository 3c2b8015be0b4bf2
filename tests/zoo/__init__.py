"""A zoo of small models with known chain structure, shared by the detection,
rewrite and backend tests. Every constructor returns ``(model, example_inputs)``."""

from .models import *  # noqa: F401,F403
from .models import __all__  # noqa: F401
