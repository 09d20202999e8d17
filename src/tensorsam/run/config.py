"""Configs: dataclasses built from defaults, a YAML/TOML/JSON file and ``--set key=value``
overrides, every value coerced to its annotated type (``Literal`` included), unknown keys refused
with the valid ones listed.

A task's config gives each field ``dataclasses.field(metadata=...)``: :data:`AFFECTS` or
:data:`NEUTRAL` (``{"affects_results": bool}``: whether it changes results), or :func:`axis` for a
list that spans a grid of runs (also ``"grid"``: the run-record key of that axis).
:func:`result_fields` and :func:`grid_fields` read them back; :func:`check_choices` refuses a value
outside a ``Literal`` in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    import tomllib

    import yaml

    readers = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".toml": tomllib.loads, ".json": json.loads}
    if suffix not in readers:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    try:
        data = readers[suffix](text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse config file {path}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content is a value error for the CLI
            f"config file {path} must hold a mapping of keys to values at its top level"
        )
    return data


def _parse_override(item: str) -> tuple[str, str]:
    key, sep, raw = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    return key, raw.strip()


def _coerce(value: Any, tp: Any, key: str, item: bool = False) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ValueError naming ``key``
    (``item``: ``value`` is one entry of the list field ``key``)."""
    bad = ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value in ("None", "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"config key {key!r}: {_unknown(key, value, args, item)}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "42,87,100" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [_yaml_scalar(v) for v in value]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"config key {key!r}: expected {len(args)} entries, got {value!r}")
            items = [_coerce(v, a, key) for v, a in zip(value, args)]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, key, item=True) for v in value]
        return origin(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                as_float = float(value)  # 5e4: YAML 1.1 reads it as a string
            except ValueError:
                raise bad from None
            if as_float.is_integer():
                return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-3": YAML 1.1 reads it as a string
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise bad
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad
    return value


def _unknown(key: str, value: Any, options, item: bool) -> str:
    """``unknown method 'x'; expected one of [...]``: the singular of a list field names its entries."""
    what = key.rsplit(".", 1)[-1]
    what = what[:-1] if item and what.endswith("s") else what
    return f"unknown {what} {value!r}; expected one of {list(options)}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(prefix + k for k in sorted(fields))}"
        )
    hints = _field_types(cls)
    kwargs = {name: _coerce(v, hints.get(name, Any), prefix + name) for name, v in values.items()}
    return cls(**kwargs)


def _field_types(cls) -> dict:
    """Resolved field annotations; an unresolvable one (a TYPE_CHECKING-only name) counts as Any."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {f.name: (Any if isinstance(f.type, str) else f.type) for f in dataclasses.fields(cls)}


def load_config(cls, path=None, overrides: Iterable[str] = ()):
    """Build the dataclass ``cls`` from its defaults, a config file, then ``key=value`` overrides.

    ``path`` is a ``.yaml``/``.yml``/``.toml``/``.json`` file holding a top-level mapping.
    Override values are parsed as YAML scalars (``1e-3``, ``[8,6,8]``, ``true``); a
    comma-separated string is accepted for list/tuple fields (``seeds=42,87,100``); a
    dotted key (``opt.lr=0.1``) reaches into a nested dataclass field.  Unknown keys raise
    a ``ValueError`` listing the valid ones; a value of the wrong type raises one naming the key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    values: dict = {}
    if path is not None:
        values.update(read_config_file(Path(path)))
    hints = _field_types(cls)
    for item in overrides or ():
        key, raw = _parse_override(item)
        parsed = raw if hints.get(key.split(".")[0]) is str else _yaml_scalar(raw)
        target = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = target.get(p)
            if not isinstance(node, dict):
                node = {}
                target[p] = node
            target = node
        target[leaf] = parsed
    return _build(cls, values)


def add_config_arguments(parser, config_name: str = "config") -> None:
    """Add ``--config FILE`` and repeatable ``--set key=value`` to an argparse parser (every command)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"YAML/TOML/JSON file of {config_name} keys")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set lr=1e-3 --set rank=[8,6,8]",
    )


def overrides_from(args, keys) -> list[str]:
    """``--set`` overrides followed by ``key=value`` for each dedicated flag in ``keys`` that was given."""
    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, key)}" for key in keys if getattr(args, key) is not None]
    return overrides


def config_from_args(cls, args, **explicit):
    """The config from ``args.config`` and ``args.overrides``; ``explicit`` (dedicated flags
    such as ``--iterations``, None = not given) are applied last, as if given with ``--set``."""
    config = getattr(args, "config", None)
    overrides = list(getattr(args, "overrides", None) or [])
    cfg = load_config(cls, config, overrides)
    given = {k: v for k, v in explicit.items() if v is not None}
    if not given:
        return cfg
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(values))}"
        )
    hints = _field_types(cls)
    values.update({k: _coerce(v, hints.get(k, Any), k) for k, v in given.items()})
    return cls(**values)


def config_to_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)) and not isinstance(cfg, Mapping):
        raise TypeError(f"config_to_dict expects a dataclass instance or mapping, got {type(cfg).__name__}")
    from tensorsam.run.io import to_jsonable

    return to_jsonable(cfg)


# ----------------------------------------------------------------------------- field metadata


# ``dataclasses.field(metadata=...)`` of a config field.  A field *changes results* when two runs that
# differ only in it can write different run records or files (timings aside): the maths, the data,
# the numerics (dtype, threads and torch.compile change the last bits) and what is recorded (a
# trace's cadence).  Fields that only change how a run is carried out (checkpoint interval,
# progress output) do not.
AFFECTS = types.MappingProxyType({"affects_results": True})
NEUTRAL = types.MappingProxyType({"affects_results": False})


def axis(key: str) -> types.MappingProxyType:
    """Metadata of a list field that spans a grid of runs (changes results): ``key`` is the grid
    coordinate's name in a run record (``methods`` -> ``"method"``)."""
    return types.MappingProxyType({"affects_results": True, "grid": str(key)})


def _instance_fields(cfg) -> tuple:
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return dataclasses.fields(cfg)


def result_fields(cfg, *, grid: bool = True) -> dict:
    """``{name: value}`` of the fields of ``cfg`` that change results (see :data:`AFFECTS`), in
    declaration order; a field without the metadata counts as changing them.  ``grid=False``
    leaves out the grid axes (what one cell of a sweep depends on besides its coordinates)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in _instance_fields(cfg)
        if f.metadata.get("affects_results", True) and (grid or "grid" not in f.metadata)
    }


def grid_fields(cfg) -> dict[str, str]:
    """``{field name: run-record key}`` of the list fields of ``cfg`` that span its grid of runs."""
    return {f.name: f.metadata["grid"] for f in _instance_fields(cfg) if "grid" in f.metadata}


def check_choices(cfg) -> None:
    """Refuse a field value (or list entry) outside its ``Literal`` annotation, with the message
    :func:`load_config` gives (``unknown model 'x'; expected one of [...]``); for ``__post_init__``."""
    hints = _field_types(type(cfg))
    for f in _instance_fields(cfg):
        tp, value = hints.get(f.name, Any), getattr(cfg, f.name)
        elem = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else None
        if typing.get_origin(elem) is typing.Literal:
            options = typing.get_args(elem)
            for v in value:
                if v not in options:
                    raise ValueError(_unknown(f.name, v, options, item=True))
        elif typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            raise ValueError(_unknown(f.name, value, typing.get_args(tp), item=False))
