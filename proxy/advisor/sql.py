"""Names and DDL as PostgreSQL reads them: identifiers quoted only where they must be, and
the CREATE INDEX a missing_index advice suggests (its hypothetical twin for HypoPG)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pglast.keywords import RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

__all__ = ["IndexSpec", "quote_ident"]

_PLAIN: Final = re.compile(r"[a-z_][a-z0-9_$]*")
_NAME_LIMIT: Final = 63  # NAMEDATALEN - 1


def quote_ident(name: str) -> str:
    """`name` as an identifier: bare when PostgreSQL would read it back unchanged."""
    if _PLAIN.fullmatch(name) and name not in RESERVED_KEYWORDS | TYPE_FUNC_NAME_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """An index the advisor may suggest: key columns in order, access method, and for a
    one-column GIN index its operator class (jsonb_path_ops, gin_trgm_ops)."""

    schema: str
    table: str
    columns: tuple[str, ...]
    method: str = "btree"
    opclass: str | None = None

    @property
    def relation(self) -> str:
        """The table as the DDL names it: the schema left out when it is public."""
        name = quote_ident(self.table)
        return name if self.schema == "public" else f"{quote_ident(self.schema)}.{name}"

    def keys(self) -> str:
        columns = ", ".join(quote_ident(c) for c in self.columns)
        return f"{columns} {self.opclass}" if self.opclass else columns

    def name(self) -> str:
        """table_col1_col2_idx, cut to PostgreSQL's 63 bytes as it would cut it."""
        name = "_".join((self.table, *self.columns, "idx"))
        return name.encode()[:_NAME_LIMIT].decode("utf-8", "ignore")

    def create_sql(self) -> str:
        return (
            f"CREATE INDEX CONCURRENTLY {quote_ident(self.name())} ON {self.relation} "
            f"USING {self.method} ({self.keys()})"
        )

    def hypothetical_sql(self) -> str:
        """The statement hypopg_create_index() takes: the same index, plain CREATE INDEX."""
        return f"CREATE INDEX ON {self.relation} USING {self.method} ({self.keys()})"

    def covers(self, other: IndexSpec) -> bool:
        """Whether this index serves whatever `other` would: a b-tree starting with all of
        `other`'s columns, on the same table."""
        return (
            (self.schema, self.table, self.method, self.opclass)
            == (other.schema, other.table, other.method, other.opclass)
            and self.method == "btree"
            and self.columns[: len(other.columns)] == other.columns
        )

    def describe(self) -> str:
        using = "" if self.method == "btree" else f" USING {self.method}"
        return f"{self.relation}{using} ({self.keys()})"
