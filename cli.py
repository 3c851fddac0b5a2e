"""Stage configurations: one typed ``Config`` per stage, its command-line parser derived from it.

A stage script declares its settings once, as a dataclass whose fields are made with ``flag``
(default, help, domain). ``parser_for(Config)`` builds the argparse parser from those fields and
``Config.from_argv(argv)`` parses a command line into a ``Config``; ``reproduce.py`` (and any
other composer) builds the same ``Config`` objects directly, with no argv strings and no flag
declared twice. Every numeric flag carries its domain (``at_least(1)``, ``positive``, ...),
checked by the parser: a bad value is one line on stderr and exit code 2, before any stage
touches the runs directory.

    @dataclass
    class Config(cli.RunConfig):
        attack: str = cli.flag("I_FGSM_Linf_1", "base attack")
        steps: int | None = cli.flag(None, "number of steps", check=cli.at_least(1))
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def flag(default: Any, help: str, *, short: str | None = None, check: Check | None = None,
         choices: typing.Sequence[Any] | None = None, metavar: str | None = None,
         cli_name: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag ``--<name-with-dashes>``.

    ``check(value)`` returns an error message (without the flag's name) or None; ``short`` is an
    extra short option (``-y``); ``cli_name`` overrides the long option's name."""
    return field(default=default, metadata={"help": help, "short": short, "check": check,
                                            "choices": choices, "metavar": metavar, "cli_name": cli_name})


# ----------------------------------------------------------------------------------- domains

def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low:g}, got {v:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be positive, got {v:g}"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be non-negative, got {v:g}"


def in_range(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must lie in [{low:g}, {high:g}], got {v:g}"


def open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else f"must lie in (0, 1), got {v:g}"


def numbers(text: str, kind: type = float) -> list:
    """The values of a comma-list flag (``"1,2,4"``), blanks skipped."""
    return [kind(v) for v in text.split(",") if v.strip()]


def number_list(smallest_ok: Callable[[float], bool], need: str, kind: type = float) -> Check:
    """The domain of a comma-list flag: numbers of ``kind`` (float, int), at least one, whose smallest
    passes ``smallest_ok``; ``need`` completes "must list ..." (e.g. "at least one positive ε")."""
    noun = "integers" if kind is int else "numbers"

    def check(text: str) -> str | None:
        try:
            values = numbers(text, kind)
        except ValueError:
            return f"must be a comma list of {noun}, got {text!r}"
        return None if values and smallest_ok(min(values)) else f"must list {need}"
    return check


# ----------------------------------------------------------------------------------- configs

def _known_dataset(name: str) -> str | None:
    import datasets
    from utils import UserError

    try:
        datasets.get(name)
    except UserError as err:
        return str(err)
    return None


def _known_arch(name: str) -> str | None:
    from network import ARCHS

    return None if name in ARCHS else f"unknown arch {name!r}; expected one of {', '.join(ARCHS)}"


# Flags that decide where and how fast a stage runs, not what it produces.
RUNTIME_FIELDS = ("device", "threads", "jobs", "workers", "name")
# Fields that name an attack or a noise set: kept in their canonical spelling.
ATTACK_FIELDS = ("attack", "detector", "noise")


def _canonical_attack(name: str) -> str:
    from attacks import parse_attack

    try:
        return parse_attack(name).name
    except Exception:  # noqa: BLE001 - an unknown name is reported by the stage, with the valid forms
        return name


@dataclass
class RunConfig:
    """The flags that select a run: ``-a``, ``-n``, ``--dataset`` (runs_<DATASET>/<name or arch>/),
    and the runtime flags every stage shares: ``--seed``, ``--device``, ``--threads``."""

    arch: str = flag("resnet50", "model architecture", short="-a", check=_known_arch)
    name: str | None = flag(None, "run name under runs_<DATASET>/ (default: the arch)", short="-n")
    dataset: str = flag("synthetic", "APTOS, CXR, imagenette, synthetic, brain3d or brain2d, case-insensitive", check=_known_dataset)
    seed: int = flag(0, "seed of every random choice", check=non_negative)
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    threads: int | None = flag(None, "torch CPU threads (default: torch's; 1 is faster on a busy CPU)",
                               check=at_least(1))

    def __post_init__(self):
        # Canonical spellings, so that settings recorded by a stage compare equal to the same
        # settings asked for later (``aptos`` and ``APTOS`` are one data set).
        import datasets
        from utils import UserError

        try:
            self.dataset = datasets.get(self.dataset).name
        except UserError:
            pass  # the stage reports it, with the list of known names
        for key in ATTACK_FIELDS:
            value = getattr(self, key, None)
            if isinstance(value, str):
                setattr(self, key, _canonical_attack(value))

    @classmethod
    def from_argv(cls, argv=None, description: str | None = None):
        """Parse a command line (``sys.argv[1:]`` when None) into this config."""
        namespace = parser_for(cls, description).parse_args(argv)
        return cls(**vars(namespace))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The settings that decide a stage's result, as plain values: what every stage records in
        its summary and what "is this stage done for these settings?" compares. The flags that
        only decide where and how fast it runs (``RUNTIME_FIELDS``) are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ``UserError``: one line on stderr and exit code 2 from
    ``utils.run_cli``, and an exception a caller can catch when ``main(argv)`` is called directly."""

    def error(self, message: str) -> typing.NoReturn:
        from utils import UserError

        raise UserError(f"{message} (see {self.prog} --help)")


_SCALARS = {int: int, float: float, str: str}


def _scalar_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if base not in (*_SCALARS, bool):
        raise TypeError(f"unsupported flag type {annotation!r}")
    return base


def _converter(kind: type, check: Check | None, name: str):
    def convert(text: str):
        try:
            value = _SCALARS[kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and value != value:  # NaN passes every comparison-free check
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        problem = check(value) if check else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def parser_for(config_cls: type, description: str | None = None) -> OneLineParser:
    """The argparse parser of a stage's ``Config``: one option per field, in declaration order."""
    doc = description if description is not None else sys.modules[config_cls.__module__].__doc__
    parser = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if "help" not in meta:
            continue  # not a command-line setting
        long_name = "--" + (meta["cli_name"] or f.name.replace("_", "-"))
        names = [meta["short"], long_name] if meta["short"] else [long_name]
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=f.default,
                                help=meta["help"].replace("%", "%%"))
            continue
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(*names, dest=f.name, type=_converter(kind, meta["check"], long_name),
                            default=f.default, choices=meta["choices"], metavar=meta["metavar"],
                            help=(meta["help"] + shown).replace("%", "%%"))
    return parser
