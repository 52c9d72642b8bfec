"""SQLAlchemy Core statements compiled once, for the paths that drive psycopg directly.

The webhook path and the projector run their statements on raw psycopg connections (pipelines,
prepared statements, one round trip per step). The statements are still built from the models'
tables, so a renamed or dropped column fails at import (or `alembic check`), never in production.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, column, func, insert, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import ClauseElement

_DIALECT = postgresql.psycopg.dialect()  # type: ignore[attr-defined]


def compiled(statement: ClauseElement) -> str:
    """The statement's SQL for psycopg, with `%(name)s` placeholders named as its bind parameters.

    Every bind parameter must be a named one the caller supplies: a constant that SQLAlchemy would
    bind by itself (`column + 1`) has no value at execution, so it is refused here (write it with
    `literal_column`).
    """
    result = statement.compile(dialect=_DIALECT)
    constants = sorted(name for name, bind in result.binds.items() if bind.value is not None or bind.callable)
    if constants:
        raise ValueError(f"constants bound as parameters (use literal_column): {constants}")
    return str(result)


def _unnested(table: Any, columns: Sequence[str], types: Mapping[str, Any] | None = None) -> Any:
    """`unnest(%(c1)s::type[], …) AS v(c1, …)`: one array parameter per column, typed as the table's."""
    types = dict(types or {})
    typed = [(name, types.get(name, table.c[name].type if name in table.c else None)) for name in columns]
    return (func.unnest(*[bindparam(name, type_=ARRAY(kind)) for name, kind in typed])
            .table_valued(*[column(name, kind) for name, kind in typed]).render_derived(name="v"))


def bulk_insert(table: Any, columns: Sequence[str]) -> str:
    """INSERT of many rows in one statement: the parameters are one list per column (`columns`)."""
    rows = _unnested(table, columns)
    return compiled(insert(table).from_select(list(columns), select(*rows.c)))


def bulk_update(table: Any, key: str, columns: Sequence[str], extra: Mapping[str, Any] | None = None) -> str:
    """UPDATE of many rows by id in one statement: parameter `key` lists the ids, each of `columns` the values."""
    rows = _unnested(table, (key, *columns), {key: table.c.id.type})
    return compiled(update(table).where(table.c.id == rows.c[key])
                    .values({name: rows.c[name] for name in columns} | dict(extra or {})))


def columns_of(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """Rows (dicts) as the parameters of a bulk statement: one list per column."""
    return {name: [row[name] for row in rows] for name in names}
