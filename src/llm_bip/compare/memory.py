"""Peak resident memory of this process inside a `with` block, for the comparison's cost table.

Freed heap is handed back to the OS (malloc_trim), the kernel's high-water mark is reset through
/proc/self/clear_refs and read back as VmHWM afterwards; where that is not possible a 5 ms sampling
thread reads VmRSS instead. Each result says which.
"""

from __future__ import annotations

import re
import threading

import torch

from llm_bip.devices import release_freed_memory


class PeakMemory:
    """Peak resident memory of this process inside a `with` block, above what it held on entry."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.how = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        # No gc.collect(): a model copy dies by reference count (it holds no cycles), and a full collection
        # costs a quarter second per call once transformers is imported.
        release_freed_memory(torch.device("cpu"))  # freed heap stays resident otherwise, and would hide new allocations
        self.start = _status_kib("VmRSS") * 1024
        if _reset_high_water_mark():
            self.how = "VmHWM after reset via /proc/self/clear_refs"
        else:
            self.how = "VmRSS sampled every 5 ms"
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _status_kib("VmHWM") * 1024

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def _status_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field_name}:\s+(\d+)", handle.read(), re.MULTILINE)
        return int(match.group(1)) if match else 0
    except OSError:
        return 0


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False
