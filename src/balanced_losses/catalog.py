"""Every method of the package by name, for code that picks one from a configuration.

:func:`methods` lists each public weighting class in its default configuration, then the
named configurations the benchmarks compare; :func:`build` makes one from its key and what a
model provides (task names, output sizes, the shared parameters). Benchmarks, tests and
examples read their methods from here, so a new method reaches all of them once its class
exists and is exported.

The list follows the classes the package defines; a test checks that each is exported.
A key is the class name in kebab case (``GradientBalancer`` is ``gradient-balancer``,
``UPGrad`` is ``upgrad``); a configuration adds a suffix (``upgrad-balanced``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Literal

from torch import Tensor, nn

from balanced_losses._base import Weighting as _Weighting

__all__ = ["Method", "build", "get", "key_of", "methods"]

Level = Literal["loss", "features"]

#: Named configurations beside each class's defaults: key, class name, constructor options.
_CONFIGURATIONS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("upgrad-balanced", "UPGrad", {"balance_norms": True}),
)

#: Classes that are bases to build on, not methods: ``GramianWeighting`` needs a rule.
_BASES = ("Weighting", "FeatureWeighting", "GramianWeighting")
#: The modules that define the methods.
_FOLDERS = ("balanced_losses.weighting.", "balanced_losses.features.")


def key_of(cls: type[_Weighting]) -> str:
    """The key of a class's default configuration: its name in kebab case.

    A hyphen goes where a lower-case letter meets an upper-case one, and everything is lower
    case: ``GradientBalancer`` gives ``gradient-balancer``, ``AlignedMTL`` ``aligned-mtl``,
    ``UPGrad`` ``upgrad``.

    Example:
        >>> import balanced_losses as bl
        >>> key_of(bl.GradientBalancer), key_of(bl.UPGrad), key_of(bl.NashMTL)
        ('gradient-balancer', 'upgrad', 'nash-mtl')
    """
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "-", cls.__name__).lower()


@dataclass(frozen=True)
class Method:
    """One configuration of one method: a class and the constructor options that differ.

    Example:
        >>> import balanced_losses as bl
        >>> method = get("upgrad-balanced")
        >>> method.label, method.level
        ('`UPGrad(balance_norms=True)`', 'features')
        >>> method.build(["depth", "segmentation"])
        UPGrad(tasks=['depth', 'segmentation'], balance_norms=True, momentum=0.9)
    """

    key: str
    cls: type[_Weighting]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def name(self) -> str:
        """The class name."""
        return self.cls.__name__

    @property
    def level(self) -> Level:
        """``"features"`` for a method that acts at the shared features (it has ``attach``)."""
        return "features" if callable(getattr(self.cls, "attach", None)) else "loss"

    @property
    def label(self) -> str:
        """How docs and tables name it: the call with its non-default options, as code."""
        if not self.options:
            return f"`{self.name}`"
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"`{self.name}({args})`"

    def build(
        self,
        tasks: Sequence[str],
        *,
        output_sizes: Mapping[str, int] | None = None,
        shared_parameters: nn.Module | Tensor | Iterable[Tensor] | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> _Weighting:
        """Construct it for ``tasks``, passing each argument only to a class that takes it.

        Args:
            tasks: Task names, in order.
            output_sizes: Each task's output size, for methods that correct for the
                reduction (``LossNormalizer``); ignored by the others.
            shared_parameters: The shared trunk's parameters, for methods that differentiate
                through them (``GradNorm``, which requires them; ``CalibratedWeighting``, which
                otherwise finds them in the graph); ignored by the others.
            seed: Seed of a method that draws random numbers (``RLW``, ``PCGrad``); ignored by
                the others.
            **options: Constructor options on top of this configuration's.

        Raises:
            TypeError: If the class requires ``shared_parameters`` and none were given.
        """
        accepted = inspect.signature(self.cls).parameters
        kwargs: dict[str, Any] = {**self.options, **options}
        args: list[Any] = [tasks]
        if "shared_parameters" in accepted:
            required = accepted["shared_parameters"].default is inspect.Parameter.empty
            if required and shared_parameters is None:
                raise TypeError(
                    f"`{self.name}` needs `shared_parameters`: the parameters of the shared "
                    "trunk it differentiates through"
                )
            if shared_parameters is not None:
                args.append(shared_parameters)
        if "output_sizes" in accepted and output_sizes is not None:
            kwargs.setdefault("output_sizes", dict(output_sizes))
        if "seed" in accepted and seed is not None:
            kwargs.setdefault("seed", seed)
        return self.cls(*args, **kwargs)


def _public_classes() -> list[type[_Weighting]]:
    """The method classes the package defines, found from the class hierarchy.

    Subclasses of the base in its two method folders (``weighting/``, ``features/``), with
    public names, the bases to build on left out. Nothing above the base is imported; the
    tests check that every class found here is exported by ``balanced_losses`` and the reverse.
    """
    found: dict[str, type[_Weighting]] = {}
    pending: list[type] = [_Weighting]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if (
            cls.__module__.startswith(_FOLDERS)
            and not cls.__name__.startswith("_")
            and cls.__name__ not in _BASES
        ):
            found[cls.__name__] = cls
    return list(found.values())


def methods(level: Level | None = None) -> tuple[Method, ...]:
    """Every method: each public class's defaults (by key), then the named configurations.

    Args:
        level: Only the loss-level (``"loss"``) or feature-level (``"features"``) ones.

    Example:
        >>> [m.key for m in methods("loss")][:3]
        ['calibrated-weighting', 'dwa', 'famo']
    """
    classes = {cls.__name__: cls for cls in _public_classes()}
    defaults = sorted((Method(key_of(cls), cls) for cls in classes.values()), key=attrgetter("key"))
    named = [Method(key, classes[name], options) for key, name, options in _CONFIGURATIONS]
    every = (*defaults, *named)
    return tuple(m for m in every if level is None or m.level == level)


def get(key: str) -> Method:
    """The method of ``key`` (see :func:`methods`).

    Raises:
        KeyError: If no method has that key; the message lists the keys.

    Example:
        >>> get("famo").name
        'FAMO'
    """
    for method in methods():
        if method.key == key:
            return method
    raise KeyError(f"no method `{key}`; expected one of {[m.key for m in methods()]}")


def build(key: str, tasks: Sequence[str], **kwargs: Any) -> _Weighting:
    """Construct the method of ``key`` for ``tasks``: ``get(key).build(tasks, **kwargs)``.

    Example:
        >>> normalizer = build("loss-normalizer", ["pointer", "countdown"],
        ...                    output_sizes={"pointer": 2, "countdown": 105})
        >>> type(normalizer).__name__, normalizer.correction
        ('LossNormalizer', 'sqrt')
    """
    return get(key).build(tasks, **kwargs)
