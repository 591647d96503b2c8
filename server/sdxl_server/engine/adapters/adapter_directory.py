"""`--lora-dir`: the adapters requests may name, one `.safetensors` file each, named by its file name.

The folder may be local, a PVC or a GCS bucket mounted by GCS FUSE, and people drop files in while the
server runs: it is listed again at most every `rescan_seconds` when asked (GetServerInfo), and at once
when a request names an adapter it does not know yet, so that a file just copied in is found by its
first request. Only files that are new or changed (size, modification time) are read, and then only
their header (lora_file.py): a listing costs a directory read. A file that cannot be used is logged in
one line, once per version of it, and listed as unusable with the reason; a file that disappears is
forgotten (a request already holding it keeps what it loaded). "Usable" means usable per request: a file
that fits the model but not the adapter bank (a LoCon convolution, a rank above --lora-max-rank) is
listed as unusable with that reason, as a request naming it is refused with it; it can still be merged
at start with --fuse-lora.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdxl_server.engine.adapters.adapter_bank import ADAPTER_COMPONENTS, BankLayout
from sdxl_server.engine.adapters.layer_names import LayerNames, layer_names_of
from sdxl_server.engine.adapters.lora_file import AdapterError, LoraFile, read_lora_file
from sdxl_server.engine.api import AdapterInfo, AdapterNotFoundError, InvalidRequestError, LoraChoice

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One file of the folder: usable (with its layers) or not (with the reason)."""

    name: str
    usable: bool
    reason: str = ""
    rank: int = 0
    file: LoraFile | None = None


class AdapterDirectory:
    """Thread-safe: GetServerInfo and request admission ask from different threads."""

    def __init__(
        self,
        root: Path,
        names: LayerNames,
        layouts: Mapping[str, BankLayout],
        *,
        rescan_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._names = names  # the model's layers, which a file's layers are checked against
        self.layouts = dict(layouts)  # the adapter banks' layouts by component: what a file must fit
        self._rescan_seconds = rescan_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) of what was read
        self._scanned_at: float | None = None

    def entries(self) -> tuple[AdapterEntry, ...]:
        """Every adapter file, by name; the folder is listed again if the last listing is old."""
        with self._lock:
            now = self._clock()
            if self._scanned_at is None or now - self._scanned_at >= self._rescan_seconds:
                self._scan(now)
            return tuple(self._entries[name] for name in sorted(self._entries))

    def find(self, name: str) -> AdapterEntry | None:
        """The adapter called `name`, or None; an unknown name lists the folder again first."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._scan(self._clock())
                entry = self._entries.get(name)
            return entry

    def _scan(self, now: float) -> None:
        self._scanned_at = now
        found: dict[str, tuple[Path, tuple[int, int]]] = {}
        try:
            with os.scandir(self.root) as listing:
                for item in listing:
                    if item.name.endswith(SUFFIX) and not item.name.startswith(".") and item.is_file():
                        stat = item.stat()
                        found[item.name[: -len(SUFFIX)]] = (Path(item.path), (stat.st_size, stat.st_mtime_ns))
        except OSError as error:  # a FUSE mount that went away: keep what was known, say so once a scan
            log.warning("cannot list the LoRA folder %s: %s", self.root, error)
            return
        for name in set(self._entries) - set(found):
            log.info("LoRA adapter %s left %s", name, self.root)
            del self._entries[name]
            del self._versions[name]
        for name, (path, version) in found.items():
            if self._versions.get(name) != version:
                self._entries[name] = self._read(name, path)
                self._versions[name] = version

    def _read(self, name: str, path: Path) -> AdapterEntry:
        try:
            lora = read_lora_file(path, self._names)
        except AdapterError as error:
            log.warning("LoRA adapter %s is unusable: %s", name, error)
            return AdapterEntry(name=name, usable=False, reason=str(error))
        problem = bank_problem(self.layouts, lora)
        if problem is not None:
            reason = f"cannot be applied per request: {problem}"
            log.warning("LoRA adapter %s is unusable: %s", name, reason)
            return AdapterEntry(name=name, usable=False, reason=reason, rank=lora.rank, file=lora)
        log.info(
            "LoRA adapter %s: rank %d, %d layers of %s",
            name,
            lora.rank,
            len(lora.layers),
            ", ".join(lora.components),
        )
        return AdapterEntry(name=name, usable=True, rank=lora.rank, file=lora)


def bank_layouts(names: LayerNames, places: int, max_rank: int) -> dict[str, BankLayout]:
    """The adapter banks' layouts, one per component a per-request adapter may change."""
    return {component: BankLayout.of(names, component, places, max_rank) for component in ADAPTER_COMPONENTS}


def open_adapter_directory(
    lora_dir: str | None, model: Any, rescan_seconds: float, places: int, max_rank: int
) -> AdapterDirectory | None:
    """The directory of `--lora-dir` for a LoadedModel (None without one), with the adapter banks'
    layouts (`places`, `max_rank`: --lora-places, --lora-max-rank), listed once at start."""
    if lora_dir is None:
        return None
    names = layer_names_of(model.params, model.pipeline.unet.config)
    directory = AdapterDirectory(
        Path(lora_dir).expanduser(),
        names,
        bank_layouts(names, places, max_rank),
        rescan_seconds=rescan_seconds,
    )
    entries = directory.entries()
    log.info("LoRA folder %s: %d adapters, %d usable", lora_dir, len(entries), sum(e.usable for e in entries))
    return directory


def adapter_infos(
    directory: AdapterDirectory | None, resident: frozenset[Path] = frozenset()
) -> tuple[AdapterInfo, ...]:
    """What GetServerInfo lists: every file of the folder, usable or not, and whether its weights are
    in the adapter bank now (`resident`: the files there)."""
    if directory is None:
        return ()
    return tuple(
        AdapterInfo(
            e.name, e.usable, e.reason, e.rank, resident=e.file is not None and e.file.path in resident
        )
        for e in directory.entries()
    )


def check_adapters(directory: AdapterDirectory | None, loras: Sequence[LoraChoice]) -> tuple[LoraFile, ...]:
    """The files a request's adapters name. Raises AdapterNotFoundError for a name the folder does not
    hold, InvalidRequestError for an unusable one (with its reason: unreadable, not this model's, or
    beyond the adapter bank)."""
    files = []
    for index, lora in enumerate(loras):
        entry = directory.find(lora.name) if directory is not None else None
        if entry is None:
            raise AdapterNotFoundError(f"loras[{index}].name", lora.name)
        if not entry.usable or entry.file is None:
            raise InvalidRequestError(
                f"loras[{index}].name", f"adapter {lora.name!r} is unusable: {entry.reason}"
            )
        files.append(entry.file)
    return tuple(files)


def bank_problem(layouts: Mapping[str, BankLayout], lora: LoraFile) -> str | None:
    """Why `lora` cannot be applied per request, or None: every layer must fit its component's adapter
    bank (`layouts`: none without --lora-dir)."""
    if not layouts:
        return "this server has no adapter bank (no --lora-dir)"
    for component in lora.components:
        layout = layouts.get(component)
        if layout is None:
            return f"per-request adapters do not cover {component}; merge it at start with --fuse-lora"
        problem = layout.problem(lora)
        if problem is not None:
            return problem
    return None
