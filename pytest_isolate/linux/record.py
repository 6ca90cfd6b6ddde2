"""Frozen records for the code the sandbox factory runs: ``dataclasses`` to the type checker, a few
lines at run time.

Importing ``dataclasses`` loads inspect, ast, dis, tokenize and re: 1.9 MB of heap. The factory is
forked once per sandbox that has a Python init (rootless, the Sandbox API; as root it starts a
tinyinit instead), and every megabyte it holds cost each such test about 0.37 ms of CPU (page
tables copied at the fork and torn down at the init's exit; measured by growing the factory by 8 MB
with ``benchmarks/overhead.py``'s suite, when every init was a Python one). So the classes the factory builds are declared with
``record(frozen=True)``: mypy checks them as frozen dataclasses, and at run time this module makes
``__init__``, ``__eq__``, ``__hash__`` and ``__repr__`` from the annotations and defaults, with no import.
"""

from __future__ import annotations

__all__ = ["asdict", "record", "replace"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import asdict as asdict
    from dataclasses import dataclass as record
    from dataclasses import replace as replace
else:

    class FrozenRecordError(AttributeError):
        """An attempt to change a field of a frozen record."""

    def _make(cls, names, defaults):
        def __init__(self, *args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, {len(args)} given")
            values = dict(zip(names, args))
            for key, value in kwargs.items():
                if key not in names or key in values:
                    raise TypeError(f"{cls.__name__}() got an unexpected or repeated argument {key!r}")
                values[key] = value
            for name in names:
                if name not in values:
                    if name not in defaults:
                        raise TypeError(f"{cls.__name__}() missing argument {name!r}")
                    values[name] = defaults[name]
                object.__setattr__(self, name, values[name])

        def _values(self):
            return tuple(getattr(self, name) for name in names)

        def __eq__(self, other):
            return _values(self) == _values(other) if other.__class__ is self.__class__ else NotImplemented

        def __hash__(self):
            return hash(_values(self))

        def __repr__(self):
            return f"{cls.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

        def __setattr__(self, name, value):
            raise FrozenRecordError(f"cannot assign to field {name!r}")

        def __delattr__(self, name):
            raise FrozenRecordError(f"cannot delete field {name!r}")

        for func in (__init__, __eq__, __hash__, __repr__, __setattr__, __delattr__):
            func.__qualname__ = f"{cls.__qualname__}.{func.__name__}"
            setattr(cls, func.__name__, func)
        cls.__record_fields__ = names
        return cls

    def record(cls=None, *, frozen=True):
        """Like ``dataclasses.dataclass(frozen=True)`` for plain fields with immutable defaults."""

        def wrap(cls):
            names = tuple(cls.__dict__.get("__annotations__", {}))
            defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
            return _make(cls, names, defaults)

        return wrap if cls is None else wrap(cls)

    def asdict(obj):
        """Like ``dataclasses.asdict``: records become dicts, recursively (tuples stay tuples)."""
        if hasattr(obj.__class__, "__record_fields__"):
            return {name: asdict(getattr(obj, name)) for name in obj.__record_fields__}
        if isinstance(obj, (list, tuple)):
            return type(obj)(asdict(v) for v in obj)
        if isinstance(obj, dict):
            return {k: asdict(v) for k, v in obj.items()}
        return obj

    def replace(obj, **changes):
        """Like ``dataclasses.replace``: a copy of the record ``obj`` with ``changes``."""
        return obj.__class__(**{**{name: getattr(obj, name) for name in obj.__record_fields__}, **changes})
