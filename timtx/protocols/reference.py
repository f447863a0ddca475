# -*- test-case-name: timtx.test.test_reference -*-
"""
The struct reference of C{docs/protocol.md}, generated from
L{timtx.protocols.structs} so that it cannot drift from the code:

    python -m timtx.protocols.reference                      # print it
    python -m timtx.protocols.reference --write docs/protocol.md

C{--write} replaces what lies between L{BEGIN} and L{END} in the file.
"""

from __future__ import annotations

from timtx.protocols.structs import ALL_STRUCTS, TIMTX, Field, Generation, TimStruct

BEGIN = "<!-- begin generated struct reference: python -m timtx.protocols.reference --write docs/protocol.md -->"
END = "<!-- end generated struct reference -->"

_LEGEND = """\
Columns: **Id** is the Thrift field id (where tim 2.0 and tim 2.1 number a
field differently, both are given); **Type** the Thrift type (`i8` to `i64`
are signed; `binary` is bytes, base64 in JSON); **JSON** the key in JSON
frames; **Dir** who sends it: `c→s` client to server, `s→c` server to
client, `both`; **Req** whether tim marks it required (always written, in
both encodings); **From** whether tim 2.0, tim 2.1 or timtx defined it:
fields marked **timtx** are timtx extensions, which tim clients skip.
"""


def _per_generation(struct: type[TimStruct], field: Field) -> dict[Generation, Field]:
    found = {}
    for generation in Generation:
        for candidate in struct.fields_in(generation):
            if candidate.name == field.name:
                found[generation] = candidate
    return found


def _either(values: dict[Generation, str]) -> str:
    """
    One value, or each generation's where they differ.
    """
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return " · ".join(f"{generation.value}: {value}" for generation, value in values.items())


def _origin(origin: str) -> str:
    return f"**{origin}**" if origin == TIMTX else origin


def struct_table(struct: type[TimStruct]) -> str:
    """
    The section of one struct: what it is for, then a row per field.
    """
    lines = [f"### {struct.__name__}", "", struct.DOC, ""]
    lines.append("| Id | Field | Type | JSON | Dir | Req | From | Meaning |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for field in struct.FIELDS:
        layouts = _per_generation(struct, field)
        fid = _either({g: str(f.fid) for g, f in layouts.items()})
        kind = _either({g: f"`{f.kind.name}`" for g, f in layouts.items()})
        origin = _either({g: _origin(f.origin) for g, f in layouts.items()})
        direction = field.direction or struct.DIRECTION
        required = "yes" if field.required else ""
        lines.append(
            f"| {fid} | `{field.name}` | {kind} | `{field.json}` | {direction} | {required} | {origin} | {field.doc} |"
        )
    lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """
    The whole generated part: the legend and a table per struct.
    """
    return "\n".join([_LEGEND, *(struct_table(struct) for struct in ALL_STRUCTS)])


def write_reference(path: str) -> None:
    """
    Replace what lies between L{BEGIN} and L{END} in C{path} with the
    reference.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{path} needs the lines {BEGIN} and {END}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n\n" + reference_markdown() + "\n" + END + tail)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_reference(sys.argv[2])
    else:
        print(reference_markdown())
