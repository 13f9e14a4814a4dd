"""Building this package's optional C++ extensions on first use, once per process, never a stale build.

Each extension is built with ``torch.utils.cpp_extension.load_inline`` under a name derived from a hash of its
source (a changed source gets its own build), at most once per process (a lock serializes threads; torch's
file lock serializes processes). Where it cannot be built (no compiler, no ninja) or ``BAYES_SPARSE_NO_CPP=1``
is set, :meth:`Extension.load` returns ``None`` and the caller takes its pure-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any, Optional, Sequence

__all__ = ["Extension"]

logger = logging.getLogger(__name__)


class Extension:
    """One lazily built C++ extension.

    Args:
        prefix: Start of the extension's name (the rest is a hash of ``source``).
        source: The C++ source.
        functions: The functions to bind.
        cflags: Extra compiler flags (``-fopenmp`` is also passed to the linker).
        what: Words for the warning when the build fails, e.g. ``"fast_csr is unavailable"``.
    """

    def __init__(self, prefix: str, source: str, functions: Sequence[str], cflags: Sequence[str], what: str) -> None:
        self.name = prefix + hashlib.sha1(source.encode()).hexdigest()[:12]
        self.source, self.functions, self.cflags, self.what = source, list(functions), list(cflags), what
        self._module: Optional[Any] = None
        self._failed = False
        self._lock = threading.Lock()

    def load(self) -> Optional[Any]:
        """The built module, or ``None`` where it cannot be built or is disabled."""
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is not None or self._failed:
                return self._module
            if os.environ.get("BAYES_SPARSE_NO_CPP") == "1":
                self._failed = True
                return None
            try:
                from torch.utils.cpp_extension import load_inline

                self._module = load_inline(name=self.name, cpp_sources=self.source, functions=self.functions,
                                           extra_cflags=self.cflags, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, ...: the extension is optional
                logger.warning("bayes_sparse: the C++ extension %s could not be built (%s); %s", self.name, e,
                               self.what)
                self._failed = True
        return self._module
