"""TensorRT-LLM-style templates: ``${key}`` placeholders in a ``config.pbtxt``, filled from ``key:value,...``
(``kiln fill-template FILE key:value,...``, as TensorRT-LLM's ``tools/fill_template.py``). Unlike that script,
a key the template does not have is refused, and so is a placeholder left unfilled: a repository never goes out
with a ``${...}`` in it, and a misspelt key is not silently dropped. A value may hold a comma written ``\\,``."""
from __future__ import annotations

import re

from kiln.errors import KilnError

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_substitutions(text: str) -> dict[str, str]:
    """``key:value,key2:value2`` (``\\,`` a comma inside a value) -> {key: value}."""
    out: dict[str, str] = {}
    for item in re.split(r"(?<!\\),", text):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        key = key.strip()
        if not sep or not PLACEHOLDER.fullmatch("${" + key + "}"):
            raise KilnError(f"substitution {item!r} is not key:value (a key is a name: letters, digits, '_')")
        if key in out:
            raise KilnError(f"substitution key '{key}' is given twice")
        out[key] = value.replace("\\,", ",")
    return out


def placeholders(template: str) -> set[str]:
    return set(PLACEHOLDER.findall(template))


def fill(template: str, values: dict[str, str], source: str = "the template") -> str:
    """``template`` with every ``${key}`` replaced by ``values[key]``; a key it lacks or a placeholder left unfilled
    is an error naming them."""
    wanted = placeholders(template)
    unknown = sorted(set(values) - wanted)
    if unknown:
        raise KilnError(f"{source} has no placeholder for {', '.join(unknown)} (it has: "
                        f"{', '.join(sorted(wanted)) or 'none'})")
    missing = sorted(wanted - set(values))
    if missing:
        raise KilnError(f"{source} still needs a value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
