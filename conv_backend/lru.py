"""Bounded in-process caches: a process that runs for months on ever new input sizes keeps the most
recently used problems, not every problem it has met."""
from __future__ import annotations

import collections
import logging
import os
import threading

log = logging.getLogger("conv_backend")
# Convolution problems a process keeps planned (dispatch) and tuned (tuning) in memory: far more than a
# model has, so only a process that keeps meeting new input sizes ever evicts one.
MAX_PLANS = 4096


class LRUCache(collections.OrderedDict):
    """A dict of at most `maxsize` entries: reading one with get() or setdefault() or assigning it makes it
    the newest, and an assignment past `maxsize` drops the least recently used.

    A dict subclass, so code that clears or iterates a plain dict works unchanged. Plans are looked up
    from several threads: assignment and setdefault() take a lock, so that two evictions never race;
    get(), the hot path of every convolution call, takes none (each OrderedDict operation is atomic), and
    a key evicted under its feet reads as missing.
    """

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"LRUCache needs maxsize >= 1, got {maxsize}")
        super().__init__()
        self.maxsize = maxsize
        # Reentrant: setdefault() assigns through __setitem__ while holding it.
        self._lock = threading.RLock()

    def get(self, key, default=None):
        try:
            self.move_to_end(key)
            return super().__getitem__(key)
        except KeyError:
            return default

    def setdefault(self, key, default=None):
        with self._lock:
            if key in self:
                self.move_to_end(key)
                return super().__getitem__(key)
            self[key] = default
            return default

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > self.maxsize:
                self.popitem(last=False)


def size_setting(name: str, default: int) -> int:
    """A positive size from the environment variable `name`, else `default` (a bad value is logged and
    ignored: a typo in a setting must not stop convolutions)."""
    setting = os.environ.get(name, "")
    if not setting.strip():
        return default
    try:
        size = int(setting)
    except ValueError:
        size = 0
    if size < 1:
        log.warning("tritonconv: ignoring %s=%r (not a positive integer); using %d", name, setting, default)
        return default
    return size


def max_plans() -> int:
    """TRITONCONV_MAX_PLANS, else MAX_PLANS."""
    return size_setting("TRITONCONV_MAX_PLANS", MAX_PLANS)
