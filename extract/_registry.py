"""Name -> extractor registry: `@register_extractor("name")`, `create_extractor(name, **kw)`, `list_extractors()`.

Modules register on import; `extract/__init__.py` imports every extractor module explicitly.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from extract._api import Extractor

T = TypeVar("T", bound=Callable[..., Extractor])

_REGISTRY: dict[str, Callable[..., Extractor]] = {}


class UnknownExtractorError(KeyError):
    """No extractor is registered under the requested name."""

    def __str__(self) -> str:
        """Plain message (KeyError would quote it)."""
        return str(self.args[0])


def register_extractor(name: str) -> Callable[[T], T]:
    """Decorator registering an Extractor subclass (or a factory returning one) under `name`; duplicates raise."""

    def deco(obj: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"an extractor is already registered under the name {name!r} ({_REGISTRY[name]!r})")
        if isinstance(obj, type) and "name" not in obj.__dict__:
            obj.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = obj
        return obj

    return deco


def list_extractors() -> list[str]:
    """Registered extractor names, sorted."""
    return sorted(_REGISTRY)


def extractor_class(name: str) -> Callable[..., Extractor]:
    """The class or factory registered under `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownExtractorError(
            f"no extractor named {name!r}; registered: {', '.join(list_extractors()) or '(none)'}"
        ) from None


def create_extractor(name: str, **kwargs: Any) -> Extractor:
    """Build the extractor registered under `name` with keyword options (weights_path, random_init, device, ...).

    ``random_init`` is False, True, or "missing": real weights when they resolve, else seeded random weights with a
    `RandomWeightsWarning` and ``provenance()["weights"] == {"random": True, "seed": s, "reason": "weights not
    found: <file>"}`` (decided once, while the extractor resolves its files: extract._api.Extractor.resolve).
    """
    return extractor_class(name)(**kwargs)


def weights_available(name: str, **kwargs: Any) -> bool:
    """Whether extractor `name` can be built with real weights for these options (False: some file not found).

    Costs one CPU construction of the extractor (models loaded, then dropped); a checksum mismatch or a missing
    explicit path still raises WeightsError. Prefer ``create_extractor(name, random_init="missing")``, which
    resolves once.
    """
    from extract._weights import WeightsNotFound

    kwargs = {**kwargs, "random_init": False, "device": "cpu"}
    try:
        create_extractor(name, **kwargs)
    except WeightsNotFound:
        return False
    return True
