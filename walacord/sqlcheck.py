"""Load-time checks of the outbox's configured SQL statements.

An outbox statement may run more than once for one operation (a crash between the
commit in PostgreSQL and the "done" mark in SQLite replays it), so it must be
idempotent. No check can prove that, so these accept the usual idempotent forms and
name what they reject. They accept an INSERT with ON CONFLICT, or a MERGE, when its
updates do not compute a column from its own value and no WITH clause changes data.
An operator vouches for any other statement with `idempotent = true`.

The checks read the SQL with its comments (nested ones too), string literals, quoted
identifiers and placeholders blanked, so "-- ON CONFLICT" or 'a;b' does not count.
"""

from __future__ import annotations

import re

# String literals, escape string literals (E'...', where a backslash escapes a quote),
# quoted identifiers and dollar-quoted strings.
_LITERAL = re.compile(
    r"(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'"
    r"|(?P<identifier>\"(?:[^\"]|\"\")*\")"
    r"|\$(?P<tag>[A-Za-z_]\w*)?\$.*?\$(?(tag)(?P=tag))\$",
    re.DOTALL)
_PLACEHOLDER = re.compile(r"%\([^)]*\)[sbt]|%%")
# A percent sign as psycopg reads it, in literals and comments too: "%%", or an
# optional "(name)" followed by the format character, which must be s, b or t.
_PERCENT = re.compile(r"%(?:\((?P<name>[^)]*)\))?(?P<format>[\s\S]?)")
# Statements that change data. UPDATE after DO (ON CONFLICT DO UPDATE) and the
# actions after THEN in a MERGE are parts of a statement, not statements.
_MODIFYING = re.compile(r"(?<!\bDO\s)(?<!\bTHEN\s)\b(INSERT|UPDATE|DELETE|MERGE)\b",
                        re.IGNORECASE)
_MAIN = re.compile(r"\b(INSERT|MERGE|UPDATE|DELETE|SELECT|VALUES|TABLE)\b", re.IGNORECASE)
_ON_CONFLICT = re.compile(r"\bON\s+CONFLICT\b", re.IGNORECASE)
_SET = re.compile(r"\b(?:DO|THEN)\s+UPDATE\s+SET\b", re.IGNORECASE)
# Keywords that end an UPDATE's SET list. WHEN alone does not, because CASE WHEN may be
# in the list.
_SET_END = re.compile(r"\b(?:WHERE|RETURNING|WHEN\s+(?:NOT\s+)?MATCHED)\b", re.IGNORECASE)
_INSERT_TARGET = re.compile(r"\bINSERT\s+INTO\s+([\w.]+)(?:\s+AS\s+(\w+))?", re.IGNORECASE)
_MERGE_TARGET = re.compile(r"\bMERGE\s+INTO\s+([\w.]+)(?:\s+(?:AS\s+)?(?!USING\b)(\w+))?",
                           re.IGNORECASE)


def sql_code(sql: str) -> str:
    """Return `sql` with its comments, literals and quoted identifiers blanked.

    Block comments nest in PostgreSQL, so `/* a /* b */ c */` is one comment.
    """
    parts: list[str] = []
    index, end = 0, len(sql)
    while index < end:
        if sql.startswith("--", index):
            newline = sql.find("\n", index)
            index = end if newline < 0 else newline
            parts.append(" ")
        elif sql.startswith("/*", index):
            depth, index = 1, index + 2
            while index < end and depth:
                if sql.startswith("/*", index):
                    depth, index = depth + 1, index + 2
                elif sql.startswith("*/", index):
                    depth, index = depth - 1, index + 2
                else:
                    index += 1
            parts.append(" ")
        elif (literal := _LITERAL.match(sql, index)) is not None:
            # A quoted identifier of word characters stays as the bare name, so the
            # checks below can follow a column or table written as "amount".
            name = (literal["identifier"] or "")[1:-1]
            parts.append(name if re.fullmatch(r"\w+", name) else " ")
            index = literal.end()
        else:
            parts.append(sql[index])
            index += 1
    return "".join(parts)


def placeholder_problem(sql: str) -> str | None:
    """Return why psycopg would refuse `sql`'s placeholders with a mapping of parameters,
    or None when they are valid."""
    formats: dict[str, str] = {}
    for match in _PERCENT.finditer(sql):
        text, name, kind = match.group(0), match["name"], match["format"]
        where = f"{text!r} at character {match.start() + 1}"
        if text == "%%":
            continue
        if kind not in ("s", "b", "t"):
            return (f"{where} is not a placeholder; write %(name)s for a parameter, and %% "
                    "for a literal percent sign (also inside quotes and comments)")
        if name is None:
            return (f"{where} is a positional placeholder; outbox statements take named "
                    "ones filled from params, such as %(amount)s")
        if not name:
            return f"{where} has no parameter name; write %(name)s"
        if formats.setdefault(name, kind) != kind:
            return (f"{where} uses parameter {name!r} with format %{kind}, after "
                    f"%{formats[name]} earlier; use one format for each parameter")
    return None


def has_several_statements(sql: str) -> bool:
    """Return True when `sql` has a `;` in its code other than one at the end.

    An ON CONFLICT in a second statement would make the first, such as
    `UPDATE ... SET amount = amount + 1`, look idempotent while a replay applies it twice.
    """
    code = sql_code(sql).rstrip()
    return ";" in code.removesuffix(";")


def idempotency_problem(sql: str) -> str | None:
    """Return why `sql` does not look idempotent, or None when it does."""
    # One space for each run of whitespace, so "DO\n  UPDATE" reads as "DO UPDATE".
    code = re.sub(r"\s+", " ", _PLACEHOLDER.sub(" ", sql_code(sql)))
    depths = _depths(code)
    main = next((m for m in _MAIN.finditer(code) if depths[m.start()] == 0), None)
    if main is None or main.group(1).upper() not in ("INSERT", "MERGE"):
        found = "no statement" if main is None else f"a {main.group(1).upper()}"
        return (f"it is {found}, not an INSERT with ON CONFLICT or a MERGE, so a replay "
                "after a crash could apply it twice")
    if main.group(1).upper() == "INSERT" and not any(
            depths[m.start()] == 0 and m.start() > main.start()
            for m in _ON_CONFLICT.finditer(code)):
        return ("its INSERT has no ON CONFLICT clause, so a replay after a crash would "
                "insert the row again")

    # Every other data-modifying statement sits in a WITH clause.
    for statement in _MODIFYING.finditer(code):
        if statement.start() == main.start():
            continue
        group = _enclosing_group(code, depths, statement.start())
        kind = statement.group(1).upper()
        if kind != "INSERT" or not any(
                depths[m.start()] == depths[statement.start()]
                for m in _ON_CONFLICT.finditer(code, statement.start(), group)):
            return (f"a WITH clause runs {'an' if kind in ('INSERT', 'UPDATE') else 'a'} "
                    f"{kind}{'' if kind != 'INSERT' else ' without ON CONFLICT'}, which a "
                    "replay after a crash runs again")

    return _self_update(code, depths)


def _self_update(code: str, depths: list[int]) -> str | None:
    """Return why an ON CONFLICT DO UPDATE or a MERGE's UPDATE sets a column from its own
    value (`amount = amount + 1`), which a replay applies twice, or None."""
    targets = [target for pattern in (_INSERT_TARGET, _MERGE_TARGET)
               for match in pattern.finditer(code) for target in match.groups() if target]
    own = {target.rsplit(".", 1)[-1].lower() for target in targets} | \
        {target.lower() for target in targets}
    for found in _SET.finditer(code):
        depth = depths[found.start()]
        stop = _clause_end(code, depths, found.end(), depth)
        for assignment in _split_top_level(code, depths, found.end(), stop, depth):
            target, equals, value = assignment.partition("=")
            # SET (a, b) = (...) assigns several columns at once.
            columns = [name.strip().rsplit(".", 1)[-1].lower()
                       for name in target.strip().strip("()").split(",")]
            if not equals:
                continue
            for column in filter(None, columns):
                if _reads_own_value(column, value, own):
                    return (f"its UPDATE computes {column} from the row's own value "
                            f"({' '.join(assignment.split())}), so a replay after a crash "
                            "applies the change twice; set columns from EXCLUDED or the "
                            "parameters only")
    return None


def _reads_own_value(column: str, value: str, own: set[str]) -> bool:
    """Return whether `value` reads `column` of the target row: bare, or qualified by
    the target table or its alias, but not by EXCLUDED or a MERGE's source."""
    for reference in re.finditer(rf"(?:([\w.]+)\s*\.\s*)?\b{re.escape(column)}\b",
                                 value, re.IGNORECASE):
        qualifier = (reference.group(1) or "").lower()
        if qualifier != "excluded" and (not qualifier or qualifier in own):
            return True
    return False


def _depths(code: str) -> list[int]:
    """Return the parenthesis depth at each character of `code`."""
    depths, depth = [], 0
    for character in code:
        if character == ")":
            depth = max(depth - 1, 0)
        depths.append(depth)
        if character == "(":
            depth += 1
    return depths


def _enclosing_group(code: str, depths: list[int], position: int) -> int:
    """Return where the parentheses around `position` close, or the end of `code`."""
    depth = depths[position]
    for index in range(position, len(code)):
        if depths[index] < depth:
            return index
    return len(code)


def _clause_end(code: str, depths: list[int], start: int, depth: int) -> int:
    """Return where the SET list starting at `start` ends: at the next keyword that ends
    it, or the parenthesis that closes its group."""
    for index in range(start, len(code)):
        if depths[index] < depth:
            return index
        if depths[index] == depth and (match := _SET_END.match(code, index)) is not None \
                and (index == 0 or not code[index - 1].isalnum()):
            return match.start()
    return len(code)


def _split_top_level(code: str, depths: list[int], start: int, stop: int,
                     depth: int) -> list[str]:
    """Split `code[start:stop]` at the commas at `depth`."""
    pieces, begin = [], start
    for index in range(start, stop):
        if code[index] == "," and depths[index] == depth:
            pieces.append(code[begin:index])
            begin = index + 1
    pieces.append(code[begin:stop])
    return pieces
