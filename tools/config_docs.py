"""Write docs/config.md, the table of every run config key, from the dataclasses of the run config.

    python tools/config_docs.py > docs/config.md     # regenerate
    python tools/config_docs.py --check              # exit 1 when docs/config.md is out of date

Each key's meaning is its field docstring in `megatron_bdgemma/training/config.py` (the string literal under the
field), read from the source with `ast`, since Python keeps no attribute docstrings at run time; a field without
one is refused by name, so every key has a meaning. Types and defaults come from the dataclasses themselves.
`tests/test_run_config.py` fails when docs/config.md differs from what this prints.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402
from megatron_bdgemma.training import config  # noqa: E402

DOC = REPO / "docs" / "config.md"
REGENERATE = "python tools/config_docs.py > docs/config.md"


def field_docstrings(source: str) -> dict[str, dict[str, str]]:
    """Class name → {field name: its docstring} of every class in `source`; the class's own docstring under ""."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs[node.name] = {"": ast.get_docstring(node) or ""}
        for field, after in zip(node.body, node.body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.name][field.target.id] = after.value.value
    return docs


def type_text(annotation: Any) -> str:
    """A field's type as a reader of YAML sees it: `int`, `one of 'a', 'b'`, `list of str`, `... or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in options)
        return f"{text} or null" if len(options) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(config.format_value(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping"
    return "any" if annotation is Any else annotation.__name__


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(source: str | None = None) -> str:
    """docs/config.md as it should read for the config module's `source` (default: the file itself)."""
    docs = field_docstrings(source if source is not None else Path(config.__file__).read_text())
    missing = []
    lines = [
        "# Run config keys",
        "",
        f"<!-- Generated from megatron_bdgemma/training/config.py by `{REGENERATE}`; do not edit. -->",
        "",
        "A run config is a YAML file of these sections (`--config`; `examples/configs/` has examples) and",
        "`section.key=value` overrides on the command line, applied in order (values are YAML).",
        "`python examples/pretrain_bdgemma.py --print-config [--config X] [--load DIR] [overrides]` prints the",
        "resolved value of every key and where it came from; the trainer saves the resolved config as",
        "`run_config.yaml` in `checkpoint.save` and in every checkpoint (`--config` reads it back).",
    ]
    for section in dataclasses.fields(config.RunConfig):
        cls = typing.get_type_hints(config.RunConfig)[section.name]
        hints, defaults = typing.get_type_hints(cls), cls()
        lines += ["", f"## `{section.name}`", "", _cell(docs[cls.__name__][""]), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            meaning = docs[cls.__name__].get(field.name)
            if not meaning:
                missing.append(f"{section.name}.{field.name}")
                continue
            kind, default = type_text(hints[field.name]), config.format_value(getattr(defaults, field.name))
            lines.append(f"| `{section.name}.{field.name}` | {_cell(kind)} | `{_cell(default)}` | {_cell(meaning)} |")
    if missing:
        raise ValueError(f"megatron_bdgemma/training/config.py: no docstring under {', '.join(missing)}; every key "
                         "needs one line of meaning (a string literal under the field)")
    return "\n".join(lines) + "\n"


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"compare with {DOC.relative_to(REPO)} instead of printing it; exit 1 when they differ")
    args = parser.parse_args(argv)
    text = render()
    if not args.check:
        sys.stdout.write(text)
        return 0
    if not DOC.is_file() or DOC.read_text() != text:
        raise ValueError(f"{DOC.relative_to(REPO)} is out of date with megatron_bdgemma/training/config.py; "
                         f"regenerate it: {REGENERATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
