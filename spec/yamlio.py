"""Reading the YAML files a user hands us (job configs, hardware profiles, plans): one strict reader.

Why one reader: PyYAML keeps the last of two equal keys without a word (`num_layers: 2` then `num_layers: 3`
trains 3 layers), a binary file fails deep inside the decoder, and a syntax error is a multi-line message. Every
file-reading path goes through `read_yaml`, so each of these is one line naming the file and the line, raised as
the caller's error type (a `LongtrainError`).
"""

from pathlib import Path
from typing import Any, Type

import yaml
from yaml.constructor import ConstructorError

from spec.errors import LongtrainError


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding one key twice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        """Keys written in this mapping (not those a `<<` merge brings, which it may override)."""
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error says so
            if first is not None:
                raise ConstructorError(None, None, f"duplicate key {key!r} (first at line {first})",
                                       key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1


def read_yaml(path: Path, what: str, error: Type[LongtrainError], fix: str = "fix the file") -> Any:
    """The YAML document in `path` (None for an empty file). `what` names the file in messages ("config file",
    "hardware profile", ...); any problem raises `error` with one line: not found, unreadable, not UTF-8 text,
    invalid YAML or a duplicate key (with the line)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as cause:
        raise error(f"{what} {path} not found") from cause
    except UnicodeDecodeError as cause:
        raise error(f"{what} {path} is not UTF-8 text (byte {cause.object[cause.start]:#04x} at offset "
                    f"{cause.start}); pass a YAML file") from cause
    except OSError as cause:
        raise error(f"{what} {path} cannot be read ({cause.strerror or cause}); pass a readable YAML file") from cause
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as cause:
        raise error(f"{what} {path} is not valid YAML{_where(cause)}: {_problem(cause)}; {fix}") from cause


def _where(cause: yaml.YAMLError) -> str:
    mark = getattr(cause, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _problem(cause: yaml.YAMLError) -> str:
    text = getattr(cause, "problem", None) or str(cause)
    return " ".join(str(text).split())
