"""The models a worker serves: cards read at start, weights loaded lazily, most recently
used kept.

A node may serve many models; holding every network in memory at once would multiply RAM
(and GPU memory) by their number. The pool reads every card when the worker starts, so a
broken folder is refused at once with a message that names the file and the key, and the
other models keep running. Weights are loaded on the first job of a model and kept in a
least-recently-used cache of ``max_loaded`` entries.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from scp_node.errors import ModelError
from scp_node.inference.registry import ModelSpec, load_model_spec

__all__ = ["LoadedModel", "ModelPool"]

logger = logging.getLogger(__name__)


class LoadedModel(Protocol):
    """What the worker needs of a loaded model (a ``Predictor``)."""

    @property
    def device(self) -> str: ...

    def predict(
        self, volume: Any, spacing_zyx: tuple[float, float, float], direction: Any = None
    ) -> Any: ...


#: Loads a model's weights; raises :class:`ModelError` (or anything) when it cannot.
Loader = Callable[[ModelSpec], LoadedModel]


class ModelPool:
    """Cards of the served models, and their loaded weights under an LRU bound.

    Parameters
    ----------
    models_dir : Path
        Folder holding one sub-folder per model.
    names : Sequence of str
        The models this worker serves (``worker.models``).
    loader : Callable[[ModelSpec], LoadedModel]
        Loads one model's weights (a Predictor per model in production, a fake in tests).
    max_loaded : int
        Most models held loaded at once (>= 1); the least recently used one is dropped to
        make room.

    Raises
    ------
    ValueError
        ``names`` is empty or ``max_loaded`` < 1.
    """

    def __init__(
        self, models_dir: Path, names: Sequence[str], loader: Loader, max_loaded: int = 2
    ) -> None:
        if not names:
            raise ValueError("names must name at least one model")
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self._loader = loader
        self._max_loaded = max_loaded
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.specs: dict[str, ModelSpec] = {}
        #: Model name -> why it does not run (names the file and the key).
        self.down: dict[str, str] = {}
        for name in dict.fromkeys(names):
            try:
                self.specs[name] = load_model_spec(models_dir, name)
            except ModelError as exc:
                self._mark_down(name, str(exc))

    def _mark_down(self, name: str, reason: str) -> None:
        self.down[name] = reason
        self.specs.pop(name, None)
        logger.error("model refused: %s", reason, extra={"model": name})

    @property
    def served(self) -> tuple[str, ...]:
        """Names of the models this pool can run (not down), in configuration order."""
        return tuple(self.specs)

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the models loaded now, least recently used first."""
        with self._lock:
            return tuple(self._loaded)

    def status(self) -> Mapping[str, str]:
        """Model name -> ``"loaded"``, ``"ready"`` (card valid, weights not loaded) or
        ``"down: <reason>"``."""
        loaded = set(self.loaded)
        result = {name: "loaded" if name in loaded else "ready" for name in self.specs}
        result.update({name: f"down: {why}" for name, why in self.down.items()})
        return result

    def get(self, name: str) -> tuple[ModelSpec, LoadedModel]:
        """The card and loaded weights of ``name``, loading them when not held.

        Loading may evict the least recently used model. A model whose weights fail to load
        is marked down (the worker stops claiming its jobs) and the error re-raised.

        Raises
        ------
        ModelError
            ``name`` is not served or is down, or its weights cannot be loaded.
        """
        with self._lock:
            spec = self.specs.get(name)
            if spec is None:
                why = self.down.get(name, "not served by this worker")
                raise ModelError(f"model {name}: {why}")
            model = self._loaded.get(name)
            if model is not None:
                self._loaded.move_to_end(name)
                return spec, model
            while len(self._loaded) >= self._max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                logger.info("model unloaded (least recently used)", extra={"model": evicted})
            try:
                model = self._loader(spec)
            except Exception as exc:
                reason = f"{spec.directory}: weights cannot be loaded: {exc}"
                self._mark_down(name, reason)
                raise ModelError(f"model {name}: {reason}") from exc
            self._loaded[name] = model
            logger.info(
                "model loaded",
                extra={"model": name, "model_version": spec.version, "device": model.device},
            )
            return spec, model
