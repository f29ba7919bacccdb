"""``ecgvlm.report`` is :mod:`ecgvlm.evaluate.report` (the evaluation stage's package); this name stays
importable for existing code and is the very same module object."""

import sys

from ecgvlm.evaluate import report as _module

sys.modules[__name__] = _module
