"""JSON schema -> GBNF, as llama.cpp's ``common/json-schema.cpp`` + ``common/json-schema-to-grammar.cpp``.

The output is the same grammar text llama.cpp produces (rules sorted by name, the same rule names and
whitespace; one exception, below), so a schema constrains lmap's output as it constrains llama.cpp's.
Supported:
``type`` (one or a list), ``object`` (``properties`` in schema order, ``required``,
``additionalProperties``), ``array`` (``items`` / ``prefixItems``, ``minItems``, ``maxItems``),
``string`` (``minLength``, ``maxLength``, ``pattern`` for anchored regular expressions without
look-around or shorthand classes, ``format`` date / time / date-time / uuid), ``integer`` (``minimum``,
``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``), ``number``, ``boolean``, ``null``, ``const``,
``enum``, ``anyOf`` / ``oneOf`` / ``allOf`` and ``$ref`` into the same document (``#/$defs/...``,
``#/definitions/...``, any JSON pointer).

One deliberate difference: for a negative ``maximum`` without a ``minimum`` llama.cpp's grammar admits
leading zeros (``-05``, which is not JSON); lmap's does not.

As llama.cpp, generation is stricter than validation: properties come in schema order, an object
without ``additionalProperties`` admits no unknown keys when it lists properties, numbers have at most
16 integral / 16 fractional digits, whitespace is limited.  An unsupported ``pattern`` degrades to
"any string" with a warning; malformed schemas raise :class:`~lmap.errors.InvalidParameterError`
naming the JSON pointer of the offending node.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParameterError

log = logging.getLogger("lmap")

__all__ = ["json_schema_to_gbnf", "format_literal"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1

SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

# name -> (content, dependencies), verbatim from llama.cpp
PRIMITIVE_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false")', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": (
        '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
        ("integral-part", "decimal-part"),
    ),
    "integer": ('("-"? integral-part)', ("integral-part",)),
    "value": (
        "object | array | string | number | boolean | null",
        ("object", "array", "string", "number", "boolean", "null"),
    ),
    "object": (
        '"{" space ( string ":" space value ("," space string ":" space value)* )? space "}"',
        ("string", "value"),
    ),
    "array": ('"[" space ( value ("," space value)* )? space "]"', ("value",)),
    "uuid": (
        '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} "\\""',
        (),
    ),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\""', ("char",)),
    "null": ('"null"', ()),
}

STRING_FORMAT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": (
        '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
        '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
        (),
    ),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\""', ("date",)),
    "time-string": ('"\\"" time "\\""', ("time",)),
    "date-time-string": ('"\\"" date-time "\\""', ("date-time",)),
}

_RESERVED = {"root", *PRIMITIVE_RULES, *STRING_FORMAT_RULES}
_INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_LITERAL_ESCAPE = re.compile(r'[\r\n"\\]')
_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "-": "\\-", "]": "\\]", "\\": "\\\\"}
_NON_LITERAL = set("|.()[]{}*+?^$")
_ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS = set("^$.[](){}*+?|")
MAX_PATTERN_DEPTH = 100


def format_literal(literal: str) -> str:
    """A GBNF string literal matching ``literal`` exactly."""
    return '"' + _LITERAL_ESCAPE.sub(lambda m: _LITERAL_ESCAPES[m.group()], literal) + '"'


def _dump(value: Any) -> str:
    """JSON text as nlohmann's ``dump()``: no spaces, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _class_char(c: str) -> str:
    # a character inside [...] of generated GBNF: the ones with a meaning there go as \x / \u escapes
    if c in "\\]-^" or ord(c) < 0x20:
        return f"\\x{ord(c):02X}"
    return c


def _escape_length(pattern: str, pos: int) -> int:
    """Length of a GBNF escape at ``pos`` that GBNF's parse_char understands, 0 if none."""
    if pos + 1 >= len(pattern) or pattern[pos] != "\\":
        return 0
    e = pattern[pos + 1]
    n_hex = {"x": 2, "u": 4, "U": 8}.get(e)
    if n_hex is None:
        return 2 if e in 'trn\\"[]-' else 0
    digits = pattern[pos + 2 : pos + 2 + n_hex]
    if len(digits) != n_hex or any(h not in "0123456789abcdefABCDEF" for h in digits):
        return 0
    return 2 + n_hex


def _stoi(s: str) -> int:
    # std::stoi: optional leading whitespace and sign, then at least one digit; the rest is ignored
    m = re.match(r"\s*[+-]?\d+", s)
    if not m:
        raise ValueError(s)
    v = int(m.group())
    if not -(2**31) <= v < 2**31:
        raise ValueError(s)
    return v


# ----------------------------------------------------------------------------------------- repetitions


def _build_repetition(item_rule: str, min_items: int, max_items: int, separator_rule: str = "") -> str:
    has_max = max_items != _INT_MAX
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return item_rule + "?"
    if not separator_rule:
        if min_items == 1 and not has_max:
            return item_rule + "+"
        if min_items == 0 and not has_max:
            return item_rule + "*"
        return item_rule + "{" + str(min_items) + "," + (str(max_items) if has_max else "") + "}"
    result = (
        item_rule
        + " "
        + _build_repetition(
            "(" + separator_rule + " " + item_rule + ")",
            0 if min_items == 0 else min_items - 1,
            max_items - 1 if has_max else max_items,
        )
    )
    if min_items == 0:
        result = "(" + result + ")?"
    return result


def _build_min_max_int(
    min_value: int, max_value: int, out: list[str], decimals_left: int = 16, top_level: bool = True
) -> None:
    has_min = min_value != _INT64_MIN
    has_max = max_value != _INT64_MAX

    def digit_range(a: str, b: str) -> None:
        out.append("[")
        out.append(a if a == b else f"{a}-{b}")
        out.append("]")

    def more_digits(min_digits: int, max_digits: int) -> None:
        out.append("[0-9]")
        if min_digits == max_digits == 1:
            return
        out.append("{")
        out.append(str(min_digits))
        if max_digits != min_digits:
            out.append(",")
            if max_digits != _INT_MAX:
                out.append(str(max_digits))
        out.append("}")

    def uniform_range(frm: str, to: str) -> None:
        i = 0
        while i < len(frm) and i < len(to) and frm[i] == to[i]:
            i += 1
        if i > 0:
            out.append('"' + frm[:i] + '"')
        if i < len(frm) and i < len(to):
            if i > 0:
                out.append(" ")
            sub_len = len(frm) - i - 1
            if sub_len > 0:
                from_sub, to_sub = frm[i + 1 :], to[i + 1 :]
                sub_zeros, sub_nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if from_sub == sub_zeros:
                    digit_range(frm[i], chr(ord(to[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{frm[i]}] ")
                    out.append("(")
                    uniform_range(from_sub, sub_nines)
                    out.append(")")
                    if ord(frm[i]) < ord(to[i]) - 1:
                        out.append(" | ")
                        if to_sub == sub_nines:
                            digit_range(chr(ord(frm[i]) + 1), to[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(frm[i]) + 1), chr(ord(to[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(to[i], to[i])
                    out.append(" ")
                    uniform_range(sub_zeros, to_sub)
                out.append(")")
            else:
                out.append(f"[{frm[i]}-{to[i]}]")

    if has_min and has_max:
        if min_value < 0 and max_value < 0:
            out.append('"-" (')
            _build_min_max_int(-max_value, -min_value, out, decimals_left, True)
            out.append(")")
            return
        if min_value < 0:
            out.append('"-" (')
            _build_min_max_int(0, -min_value, out, decimals_left, True)
            out.append(") | ")
            min_value = 0
        min_s, max_s = str(min_value), str(max_value)
        for digits in range(len(min_s), len(max_s)):
            uniform_range(min_s, "9" * digits)
            min_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(min_s, max_s)
        return

    less_decimals = max(decimals_left - 1, 1)

    if has_min:
        if min_value < 0:
            out.append('"-" (')
            _build_min_max_int(_INT64_MIN, -min_value, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif min_value == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less_decimals)
            else:
                more_digits(1, decimals_left)
        elif min_value <= 9:
            c = str(min_value)
            range_start = "1" if top_level else "0"
            if c > range_start:
                digit_range(range_start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less_decimals)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less_decimals)
        else:
            min_s = str(min_value)
            length = len(min_s)
            c = min_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(length, less_decimals)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            _build_min_max_int(int(min_s[1:]), _INT64_MAX, out, less_decimals, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(length - 1, less_decimals)
        return

    if has_max:
        if max_value >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less_decimals)
                out.append(" | ")
            _build_min_max_int(0, max_value, out, decimals_left, True)
        else:
            # llama.cpp passes top_level=false here, which lets the magnitude start with 0 ("-05", not
            # JSON); lmap keeps leading zeros out: the one place its grammar text differs from llama.cpp's
            out.append('"-" (')
            _build_min_max_int(-max_value, _INT64_MAX, out, decimals_left, True)
            out.append(")")
        return

    raise InvalidParameterError("integer range: at least one of minimum or maximum must be set")


# ------------------------------------------------------------------------------------ schema nodes
# (json-schema.cpp: the supported subset, normalized)


class _Node:
    kind = "any"


@dataclass(eq=False)
class _Any(_Node):
    kind = "any"


@dataclass(eq=False)
class _Ref(_Node):
    ref: str
    targets: dict[str, _Node | None]
    kind = "ref"

    @property
    def target(self) -> _Node | None:
        return self.targets.get(self.ref)


@dataclass(eq=False)
class _AnyOf(_Node):
    children: list[_Node]
    kind = "anyOf"


@dataclass(eq=False)
class _AllOf(_Node):
    children: list[_Node]
    kind = "allOf"


@dataclass(eq=False)
class _Const(_Node):
    value: Any
    kind = "const"


@dataclass(eq=False)
class _Enum(_Node):
    values: list[Any]
    kind = "enum"


@dataclass(eq=False)
class _Null(_Node):
    kind = "null"


@dataclass(eq=False)
class _Boolean(_Node):
    kind = "boolean"


@dataclass(eq=False)
class _Number(_Node):
    kind = "number"


@dataclass(eq=False)
class _Integer(_Node):
    minimum: int = _INT64_MIN
    maximum: int = _INT64_MAX
    kind = "integer"


@dataclass(eq=False)
class _String(_Node):
    pattern: str = ""
    format: str = ""  # "", "uuid", "date", "time", "date-time"
    min_length: int = 0
    max_length: int = -1
    kind = "string"


@dataclass(eq=False)
class _Array(_Node):
    items: _Node
    min_items: int = 0
    max_items: int = -1
    kind = "array"


@dataclass(eq=False)
class _Tuple(_Node):
    items: list[_Node]
    kind = "tuple"


@dataclass(eq=False)
class _Object(_Node):
    properties: list[tuple[str, _Node, bool]] = field(default_factory=list)
    additional: _Node | None = None
    kind = "object"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Builder:
    """``common_chat_schema_builder``: JSON schema -> nodes, with errors naming the JSON pointer."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, _Node | None] = {}

    @staticmethod
    def fail(path: str, msg: str) -> InvalidParameterError:
        return InvalidParameterError(f"JSON schema error at {path}: {msg}")

    def count(self, schema: Mapping[str, Any], key: str, path: str, default: int) -> int:
        if key not in schema:
            return default
        v = schema[key]
        if not _is_int(v) or v < 0:
            raise self.fail(path, f"{key} must be a non-negative integer")
        return min(v, _INT_MAX)

    def bound(self, schema: Mapping[str, Any], key: str, path: str, round_up: bool) -> int:
        v = schema[key]
        if _is_int(v):
            return v
        if not _is_number(v) or not math.isfinite(v):
            raise self.fail(path, f"{key} must be a number")
        return math.ceil(v) if round_up else math.floor(v)

    def format(self, schema: Mapping[str, Any], path: str) -> str:
        if "format" not in schema:
            return ""
        f = schema["format"]
        if not isinstance(f, str):
            raise self.fail(path, "format must be a string")
        if f in ("date", "time", "date-time"):
            return f
        if f == "uuid" or (len(f) == 5 and f.startswith("uuid") and "1" <= f[4] <= "5"):
            return "uuid"
        return ""

    def resolve(self, ref: str, path: str) -> Any:
        target = self.root
        for sel in ref[1:].split("/")[1:]:
            sel = sel.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and sel in target:
                target = target[sel]
            elif isinstance(target, list):
                idx = int(sel) if sel.isdigit() else len(target)
                if idx >= len(target):
                    raise self.fail(path, f"cannot resolve $ref {ref}, {sel} is out of range")
                target = target[idx]
            else:
                raise self.fail(path, f"cannot resolve $ref {ref}, {sel} not found")
        return target

    def build_ref(self, value: Any, path: str) -> _Node:
        if not isinstance(value, str):
            raise self.fail(path, "$ref must be a string")
        if not value.startswith("#/"):
            raise self.fail(path, f"unsupported $ref {value}, only references into the same document are supported")
        if value not in self.refs:
            self.refs[value] = None  # a cycle back to this $ref stops here
            self.refs[value] = self.node(self.resolve(value, path), value)
        return _Ref(value, self.refs)

    def alternatives(self, alts: Any, path: str) -> list[_Node]:
        if not isinstance(alts, list):
            raise self.fail(path, "must be an array of schemas")
        if not alts:
            raise self.fail(path, "must not be empty")
        return [self.node(a, f"{path}/{i}") for i, a in enumerate(alts)]

    def build_object(self, schema: Mapping[str, Any], path: str) -> _Node:
        node = _Object()
        required: set[str] = set()
        if isinstance(schema.get("required"), list):
            required = {r for r in schema["required"] if isinstance(r, str)}
        if "properties" in schema:
            props = schema["properties"]
            if not isinstance(props, Mapping):
                raise self.fail(path, "properties must be an object")
            for name, prop in props.items():
                node.properties.append((name, self.node(prop, f"{path}/properties/{name}"), name in required))
        if "additionalProperties" in schema:
            add = schema["additionalProperties"]
            if isinstance(add, bool):
                if add:
                    node.additional = _Any()
            elif isinstance(add, Mapping):
                node.additional = self.node(add, f"{path}/additionalProperties")
            else:
                raise self.fail(path, "additionalProperties must be a boolean or a schema")
        elif "properties" not in schema:
            node.additional = _Any()  # {"type": "object"} on its own accepts any object
        return node

    def build_array(self, schema: Mapping[str, Any], path: str) -> _Node:
        items_node: _Node
        if "items" in schema or "prefixItems" in schema:
            key = "items" if "items" in schema else "prefixItems"
            items = schema[key]
            if isinstance(items, list):
                return _Tuple([self.node(it, f"{path}/{key}/{i}") for i, it in enumerate(items)])
            items_node = self.node(items, f"{path}/{key}")
        else:
            items_node = _Any()
        return _Array(items_node, self.count(schema, "minItems", path, 0), self.count(schema, "maxItems", path, -1))

    def build_string(self, schema: Mapping[str, Any], path: str) -> _Node:
        node = _String()
        if "pattern" in schema:
            if not isinstance(schema["pattern"], str):
                raise self.fail(path, "pattern must be a string")
            node.pattern = schema["pattern"]
        node.format = self.format(schema, path)
        node.min_length = self.count(schema, "minLength", path, 0)
        node.max_length = self.count(schema, "maxLength", path, -1)
        return node

    def build_integer(self, schema: Mapping[str, Any], path: str) -> _Node:
        node = _Integer()
        if "minimum" in schema:
            node.minimum = self.bound(schema, "minimum", path, True)
        elif "exclusiveMinimum" in schema:
            node.minimum = self.bound(schema, "exclusiveMinimum", path, False) + 1
        if "maximum" in schema:
            node.maximum = self.bound(schema, "maximum", path, False)
        elif "exclusiveMaximum" in schema:
            node.maximum = self.bound(schema, "exclusiveMaximum", path, True) - 1
        node.minimum = max(node.minimum, _INT64_MIN)
        node.maximum = min(node.maximum, _INT64_MAX)
        return node

    def node(self, schema: Any, path: str) -> _Node:
        if schema is True:
            return _Any()
        if not isinstance(schema, Mapping):
            raise self.fail(path, "schema must be an object")
        if "$ref" in schema:
            return self.build_ref(schema["$ref"], path)
        if "oneOf" in schema or "anyOf" in schema:
            key = "oneOf" if "oneOf" in schema else "anyOf"
            return _AnyOf(self.alternatives(schema[key], f"{path}/{key}"))
        typ = schema.get("type")
        if isinstance(typ, list):
            if not typ:
                raise self.fail(path, "type must not be empty")
            return _AnyOf([self.node({**schema, "type": t}, f"{path}/type/{i}") for i, t in enumerate(typ)])
        if "const" in schema:
            return _Const(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path, "enum must be a non-empty array")
            return _Enum(list(values))
        if typ is not None and not isinstance(typ, str):
            raise self.fail(path, "type must be a string or an array of strings")
        type_name = typ or ""
        has_properties = "properties" in schema or (
            "additionalProperties" in schema and schema["additionalProperties"] is not True
        )
        if not type_name:
            # without a type the structural keywords decide
            if has_properties:
                return self.build_object(schema, path)
            if "allOf" in schema:
                return _AllOf(self.alternatives(schema["allOf"], f"{path}/allOf"))
            if "items" in schema or "prefixItems" in schema:
                return self.build_array(schema, path)
            if any(k in schema for k in ("pattern", "minLength", "maxLength")) or self.format(schema, path):
                return self.build_string(schema, path)
            return _Any()
        if type_name == "object":
            if not has_properties and "allOf" in schema:
                return _AllOf(self.alternatives(schema["allOf"], f"{path}/allOf"))
            return self.build_object(schema, path)
        if type_name == "string":
            if "allOf" in schema:
                return _AllOf(self.alternatives(schema["allOf"], f"{path}/allOf"))
            return self.build_string(schema, path)
        if type_name == "array":
            return self.build_array(schema, path)
        if type_name == "integer":
            return self.build_integer(schema, path)
        if type_name == "number":
            return _Number()
        if type_name == "boolean":
            return _Boolean()
        if type_name == "null":
            return _Null()
        raise self.fail(path, f"unrecognized type {type_name}")


# --------------------------------------------------------------------------------------- converter


class _UnsupportedPattern(Exception):
    pass


class _InvalidPattern(Exception):
    pass


class _Converter:
    """``common_chat_schema_converter``: nodes -> GBNF rules."""

    def __init__(self, dotall: bool = False) -> None:
        self.dotall = dotall
        self.rules: dict[str, str] = {"space": SPACE_RULE}
        self.refs_being_resolved: set[str] = set()
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add_rule(self, name: str, rule: str) -> str:
        esc = _INVALID_RULE_CHARS.sub("-", name)
        if esc not in self.rules or self.rules[esc] == rule:
            self.rules[esc] = rule
            return esc
        i = 0
        while f"{esc}{i}" in self.rules and self.rules[f"{esc}{i}"] != rule:
            i += 1
        key = f"{esc}{i}"
        self.rules[key] = rule
        return key

    def add_primitive(self, name: str, rule: tuple[str, tuple[str, ...]]) -> str:
        n = self.add_rule(name, rule[0])
        for dep in rule[1]:
            dep_rule = PRIMITIVE_RULES.get(dep) or STRING_FORMAT_RULES.get(dep)
            if dep_rule is None:
                self.errors.append(f"Rule {dep} not known")
                continue
            if dep not in self.rules:
                self.add_primitive(dep, dep_rule)
        return n

    def union(self, name: str, alts: list[_Node]) -> str:
        return " | ".join(
            self.visit(a, name + ("alternative-" if not name else "-") + str(i)) for i, a in enumerate(alts)
        )

    # --- patterns

    def visit_pattern(self, pattern: str, name: str) -> str:
        snapshot = dict(self.rules)
        try:
            return self.pattern_to_rule(pattern, name)
        except _UnsupportedPattern as e:
            self.rules = snapshot
            self.warnings.append(f"pattern {pattern} is not supported ({e}), accepting any string")
            return self.add_rule(name, self.add_primitive("string", PRIMITIVE_RULES["string"]))
        except _InvalidPattern as e:
            self.rules = snapshot
            self.errors.append(f"Invalid pattern {pattern}: {e}")
            return ""

    def pattern_to_rule(self, pattern: str, name: str) -> str:
        if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
            raise _UnsupportedPattern("not anchored with '^' and '$'")
        sub = pattern[1:-1]
        sub_rule_ids: dict[str, str] = {}
        length = len(sub)
        i = 0
        depth = 0

        def to_rule(ls: tuple[str, bool]) -> str:
            return f'"{ls[0]}"' if ls[1] else ls[0]

        def get_dot() -> str:
            return self.add_rule("dot", "[\\U00000000-\\U0010FFFF]" if self.dotall else "[^\\x0A\\x0D]")

        def transform() -> tuple[str, bool]:
            nonlocal i, depth
            seq: list[tuple[str, bool]] = []

            def join_seq() -> tuple[str, bool]:
                ret: list[tuple[str, bool]] = []
                literal = ""
                for item in seq:
                    if item[1]:
                        literal += item[0]
                    else:
                        if literal:
                            ret.append((literal, True))
                            literal = ""
                        ret.append(item)
                if literal:
                    ret.append((literal, True))
                return " ".join(to_rule(x) for x in ret), False

            while i < length:
                c = sub[i]
                if c == ".":
                    seq.append((get_dot(), False))
                    i += 1
                elif c == "(":
                    i += 1
                    if i < length and sub[i] == "?":
                        if i + 1 < length and sub[i + 1] == ":":
                            i += 2
                        else:
                            raise _UnsupportedPattern("unsupported group syntax")
                    depth += 1
                    if depth > MAX_PATTERN_DEPTH:
                        raise _UnsupportedPattern("pattern nesting too deep")
                    seq.append(("(" + to_rule(transform()) + ")", False))
                elif c == ")":
                    i += 1
                    if depth == 0:
                        raise _InvalidPattern("unbalanced parentheses")
                    depth -= 1
                    return join_seq()
                elif c in "^$":
                    raise _UnsupportedPattern("anchor inside the pattern")
                elif c == "[":
                    brackets = c
                    i += 1
                    while i < length and sub[i] != "]":
                        if sub[i] == "\\":
                            n = _escape_length(sub, i)
                            if n == 0:
                                raise _UnsupportedPattern(f"unsupported escape in character class: {sub[i : i + 2]}")
                            brackets += sub[i : i + n]
                            i += n
                        else:
                            brackets += sub[i]
                            i += 1
                    if i >= length:
                        raise _InvalidPattern("unterminated character class")
                    brackets += "]"
                    i += 1
                    seq.append((brackets, False))
                elif c == "|":
                    seq.append(("|", False))
                    i += 1
                elif c in "*+?":
                    if not seq:
                        raise _InvalidPattern("nothing to repeat")
                    seq[-1] = (to_rule(seq[-1]) + c, False)
                    i += 1
                elif c == "{":
                    curly = c
                    i += 1
                    while i < length and sub[i] != "}":
                        curly += sub[i]
                        i += 1
                    if i >= length:
                        raise _UnsupportedPattern("unterminated curly brackets")
                    curly += "}"
                    i += 1
                    nums = curly[1:-1].split(",")
                    min_times, max_times = 0, _INT_MAX
                    if len(nums) not in (1, 2):
                        raise _UnsupportedPattern("wrong number of values in curly brackets")
                    try:
                        if len(nums) == 1:
                            min_times = max_times = _stoi(nums[0])
                        else:
                            if nums[0]:
                                min_times = _stoi(nums[0])
                            if nums[1]:
                                max_times = _stoi(nums[1])
                    except ValueError as e:
                        raise _UnsupportedPattern("invalid number in curly brackets") from e
                    if not seq:
                        raise _InvalidPattern("nothing to repeat")
                    sub_text, sub_is_literal = seq[-1]
                    if not sub_is_literal:
                        sid = sub_rule_ids.get(sub_text)
                        if sid is None:
                            sid = self.add_rule(f"{name}-{len(sub_rule_ids) + 1}", sub_text)
                            sub_rule_ids[sub_text] = sid
                        sub_text = sid
                    seq[-1] = (
                        _build_repetition(f'"{sub_text}"' if sub_is_literal else sub_text, min_times, max_times),
                        False,
                    )
                else:
                    literal = ""
                    while i < length:
                        if sub[i] == "\\":
                            if i == length - 1:
                                raise _InvalidPattern("trailing backslash")
                            nxt = sub[i + 1]
                            if nxt in _ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS:
                                i += 1
                                literal += sub[i]
                                i += 1
                            else:
                                n = _escape_length(sub, i)
                                if n == 0:
                                    raise _UnsupportedPattern(f"unsupported escape: {sub[i : i + 2]}")
                                literal += sub[i : i + n]
                                i += n
                        elif sub[i] == '"':
                            literal += '\\"'
                            i += 1
                        elif sub[i] not in _NON_LITERAL and (
                            i == length - 1 or not literal or sub[i + 1] == "." or sub[i + 1] not in _NON_LITERAL
                        ):
                            literal += sub[i]
                            i += 1
                        else:
                            break
                    if not literal:
                        raise _UnsupportedPattern(f"unsupported character: {c}")
                    seq.append((literal, True))
            return join_seq()

        rule = to_rule(transform())
        if depth != 0:
            raise _InvalidPattern("unbalanced parentheses")
        return self.add_rule(name, '"\\"" (' + rule + ') "\\""')

    # --- objects

    def not_strings(self, strings: list[str]) -> str:
        """A JSON string rule matching none of ``strings`` (llama.cpp's ``_not_strings`` over a trie)."""
        trie: dict[str, Any] = {}
        for s in strings:
            node = trie
            for ch in s:
                node = node.setdefault(ch, {})
            node[""] = True  # end marker
        char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
        out: list[str] = ['["] ( ']

        def visit(node: dict[str, Any]) -> None:
            rejects = ""
            first = True
            for ch in sorted(k for k in node if k):
                child = node[ch]
                rejects += _class_char(ch)
                if not first:
                    out.append(" | ")
                first = False
                out.append(f"[{_class_char(ch)}]")
                if any(k for k in child if k):
                    out.append(" (")
                    visit(child)
                    out.append(")")
                else:
                    out.append(f" {char_rule}+")
            if any(k for k in node if k):
                out.append(f' | [^"{rejects}] {char_rule}*')

        visit(trie)
        out.append(" )")
        if "" not in trie:
            out.append("?")
        out.append(' ["]')
        return "".join(out)

    def resolve_ref(self, node: _Ref) -> str:
        frag = node.ref.split("#", 1)[1] if "#" in node.ref else node.ref
        ref_name = "ref" + _INVALID_RULE_CHARS.sub("-", frag)
        if ref_name not in self.rules and node.ref not in self.refs_being_resolved:
            target = node.target
            if target is None:
                self.errors.append(f"Unresolved $ref {node.ref}")
                return ""
            self.refs_being_resolved.add(node.ref)
            ref_name = self.visit(target, ref_name)
            self.refs_being_resolved.discard(node.ref)
        return ref_name

    def build_object_rule(
        self,
        properties: list[tuple[str, _Node]],
        required: set[str],
        name: str,
        additional: _Node | None,
    ) -> str:
        required_props: list[str] = []
        optional_props: list[str] = []
        kv_rules: dict[str, str] = {}
        prop_names: list[str] = []
        dash = "" if not name else "-"
        for prop_name, prop_schema in properties:
            prop_rule = self.visit(prop_schema, name + dash + prop_name)
            kv_rules[prop_name] = self.add_rule(
                name + dash + prop_name + "-kv", format_literal(_dump(prop_name)) + ' space ":" space ' + prop_rule
            )
            (required_props if prop_name in required else optional_props).append(prop_name)
            prop_names.append(prop_name)
        if additional is not None:
            sub_name = name + dash + "additional"
            value_rule = (
                self.visit(additional, sub_name + "-value")
                if additional.kind != "any"
                else self.add_primitive("value", PRIMITIVE_RULES["value"])
            )
            key_rule = (
                self.add_primitive("string", PRIMITIVE_RULES["string"])
                if not prop_names
                else self.add_rule(sub_name + "-k", self.not_strings(prop_names))
            )
            kv_rules["*"] = self.add_rule(sub_name + "-kv", key_rule + ' ":" space ' + value_rule)
            optional_props.append("*")

        if not required_props and not optional_props:
            return '"{" space "}"'

        rule = '"{" space '
        rule += ' "," space '.join(kv_rules[k] for k in required_props)
        if optional_props:
            rule += " ("
            if required_props:
                rule += ' "," space ( '

            def recursive_refs(ks: list[str], first_is_optional: bool) -> str:
                if not ks:
                    return ""
                k = ks[0]
                kv = kv_rules[k]
                comma_ref = f'( "," space {kv} )'
                if first_is_optional:
                    res = comma_ref + ("*" if k == "*" else "?")
                else:
                    res = kv + (" " + comma_ref + "*" if k == "*" else "")
                if len(ks) > 1:
                    res += " " + self.add_rule(name + dash + k + "-rest", recursive_refs(ks[1:], True))
                return res

            rule += " | ".join(recursive_refs(optional_props[i:], False) for i in range(len(optional_props)))
            if required_props:
                rule += " )"
            rule += " )?"
        rule += ' space "}"'
        return rule

    def visit_all_of(self, node: _AllOf, name: str, rule_name: str) -> str:
        required: set[str] = set()
        properties: list[tuple[str, _Node]] = []
        enum_counts: dict[str, int] = {}

        def add_component(comp: _Node, is_required: bool) -> None:
            if isinstance(comp, _Ref):
                if comp.target is not None:
                    add_component(comp.target, is_required)
            elif isinstance(comp, _Object):
                for prop_name, prop_schema, _ in comp.properties:
                    properties.append((prop_name, prop_schema))
                    if is_required:
                        required.add(prop_name)
            elif isinstance(comp, _Enum):
                for v in comp.values:
                    lit = format_literal(_dump(v))
                    enum_counts[lit] = enum_counts.get(lit, 0) + 1

        for child in node.children:
            if isinstance(child, _AnyOf):
                for alt in child.children:
                    add_component(alt, False)
            else:
                add_component(child, True)
        if enum_counts:
            # std::map order: sorted by the literal's text
            inter = [lit for lit in sorted(enum_counts) if enum_counts[lit] == len(node.children)]
            if inter:
                return self.add_rule(rule_name, "(" + " | ".join(inter) + ")")
        return self.add_rule(rule_name, self.build_object_rule(properties, required, name, None))

    # --- dispatch

    def visit_primitive(self, rule_name: str, typ: str) -> str:
        return self.add_primitive("root" if rule_name == "root" else typ, PRIMITIVE_RULES[typ])

    def visit(self, node: _Node, name: str) -> str:
        rule_name = name + "-" if name in _RESERVED else (name or "root")
        sub_name = name + ("-" if name else "")
        if isinstance(node, _Ref):
            return self.add_rule(rule_name, self.resolve_ref(node))
        if isinstance(node, _AnyOf):
            return self.add_rule(rule_name, self.union(name, node.children))
        if isinstance(node, _AllOf):
            return self.visit_all_of(node, name, rule_name)
        if isinstance(node, _Const):
            return self.add_rule(rule_name, format_literal(_dump(node.value)))
        if isinstance(node, _Enum):
            return self.add_rule(rule_name, "(" + " | ".join(format_literal(_dump(v)) for v in node.values) + ")")
        if isinstance(node, _Object):
            if not node.properties and node.additional is not None and node.additional.kind == "any":
                return self.add_rule(rule_name, self.add_primitive("object", PRIMITIVE_RULES["object"]))
            props = [(n, s) for n, s, _ in node.properties]
            required = {n for n, _, r in node.properties if r}
            return self.add_rule(rule_name, self.build_object_rule(props, required, name, node.additional))
        if isinstance(node, _Tuple):
            parts = [self.visit(it, f"{sub_name}tuple-{i}") for i, it in enumerate(node.items)]
            return self.add_rule(rule_name, '"[" space ' + ' "," space '.join(parts) + ' space "]"')
        if isinstance(node, _Array):
            if node.items.kind == "any" and node.min_items == 0 and node.max_items < 0:
                return self.visit_primitive(rule_name, "array")
            item_rule = self.visit(node.items, sub_name + "item")
            max_items = _INT_MAX if node.max_items < 0 else node.max_items
            rep = _build_repetition(item_rule, node.min_items, max_items, '"," space')
            return self.add_rule(rule_name, '"[" space ' + rep + ' space "]"')
        if isinstance(node, _String):
            if node.pattern:
                return self.visit_pattern(node.pattern, rule_name)
            if node.format == "uuid":
                return self.visit_primitive(rule_name, "uuid")
            if node.format:
                prim = node.format + "-string"
                return self.add_rule(rule_name, self.add_primitive(prim, STRING_FORMAT_RULES[prim]))
            if node.min_length > 0 or node.max_length >= 0:
                char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
                max_len = _INT_MAX if node.max_length < 0 else node.max_length
                return self.add_rule(
                    rule_name, '"\\"" ' + _build_repetition(char_rule, node.min_length, max_len) + ' "\\""'
                )
            return self.visit_primitive(rule_name, "string")
        if isinstance(node, _Integer):
            if node.minimum == _INT64_MIN and node.maximum == _INT64_MAX:
                return self.visit_primitive(rule_name, "integer")
            out: list[str] = ["("]
            _build_min_max_int(node.minimum, node.maximum, out)
            out.append(")")
            return self.add_rule(rule_name, "".join(out))
        if isinstance(node, _Number):
            return self.visit_primitive(rule_name, "number")
        if isinstance(node, _Boolean):
            return self.visit_primitive(rule_name, "boolean")
        if isinstance(node, _Null):
            return self.visit_primitive(rule_name, "null")
        return self.add_rule(rule_name, self.add_primitive("value", PRIMITIVE_RULES["value"]))

    def format_grammar(self) -> str:
        return "".join(f"{name} ::= {rule}\n" for name, rule in sorted(self.rules.items()))


def json_schema_to_gbnf(schema: Mapping[str, Any] | str | bool, *, warn: Callable[[str], None] | None = None) -> str:
    """GBNF text for a JSON schema (a dict, or JSON text), as llama.cpp's ``json_schema_to_grammar``.

    Raises :class:`InvalidParameterError` for schemas outside the supported subset (naming the JSON
    pointer of the node) and for invalid ``pattern`` regular expressions; an unsupported pattern logs
    a warning (or calls ``warn``) and accepts any string there.
    """
    if isinstance(schema, str | bytes):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidParameterError(f"JSON schema is not valid JSON: {e}") from e
    root = _Builder(schema).node(schema, "#")
    conv = _Converter()
    conv.visit(root, "")
    if conv.errors:
        raise InvalidParameterError("JSON schema conversion failed: " + "; ".join(conv.errors))
    if conv.warnings:
        msg = "JSON schema conversion was incomplete: " + "; ".join(conv.warnings)
        (warn or log.warning)(msg)
    return conv.format_grammar()
