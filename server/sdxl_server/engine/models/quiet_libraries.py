"""Keep the logs of processes that load Flax models readable.

diffusers 0.39 and transformers 4.57 deprecated their Flax classes. diffusers logs a warning from the
`setup()` of every Flax module it builds (hundreds per SDXL load, and again at every trace), and
transformers logs one per process. Both go through each library's own `logging` setup, not through
`warnings`, so warning filters alone do not catch them. We drop exactly those lines and leave every other
warning of both libraries (missing weights, bad configs) visible.
"""

from __future__ import annotations

import logging
import warnings

# Both libraries word it "... classes are deprecated and will be removed in ...".
_DEPRECATION_MARKER = "classes are deprecated and will be removed"


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _DEPRECATION_MARKER not in record.getMessage()


_FILTER = _DropFlaxDeprecation()


def silence_library_noise() -> None:
    """Drop the Flax deprecation notices of diffusers and transformers. Idempotent."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Each library logs through child loggers that propagate to its root logger, where it installs its
    # own handler and stops propagation. A filter on a logger would only see records logged on that very
    # logger, so the filter goes on the root's handlers, which see every record of the library.
    for library, library_logging in (
        ("diffusers", diffusers_logging),
        ("transformers", transformers_logging),
    ):
        library_logging.get_logger(library)  # makes the library install its root handler now
        for handler in logging.getLogger(library).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    # The same notice in `warnings` form, in case a later patch release switches to it.
    warnings.filterwarnings("ignore", message=f".*{_DEPRECATION_MARKER}.*")
