"""The product catalog: the seed's JSON format loaded into in-memory SQLite with FTS5 search.

Callers describe products in their own words ("a quiet washer for my big family"), so search is
forgiving: every useful word counts but none is required (OR), words are stemmed (porter), stop
words are dropped, a few everyday synonyms are added, and a word the catalog does not know is
replaced by the closest indexed words (typos such as "washin"). Results are ranked by BM25 with
the product name weighted highest.

The catalog file can change while calls are live: `reload_if_changed` builds a new database from
the new file and swaps it in with one attribute assignment, only if the new file loaded. A bad
file never replaces a good catalog.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import re
import sqlite3
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bot.cli import CommandParser
from bot.products import Product

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 5
MAX_LIMIT = 50
# bm25() weights, in column order: name, brand, description, faqs.
NAME_WEIGHT = 10.0
BRAND_WEIGHT = 4.0
DESCRIPTION_WEIGHT = 2.0
FAQ_WEIGHT = 1.0
COLUMN_WEIGHTS = (NAME_WEIGHT, BRAND_WEIGHT, DESCRIPTION_WEIGHT, FAQ_WEIGHT)
TYPO_CUTOFF = 0.75  # difflib ratio a stranger word needs to stand in for a query word
MAX_CORRECTIONS_PER_WORD = 3
MIN_WORD_CHARS = 2
MIN_PREFIX_CHARS = 3
MAX_QUERY_WORDS = 24
TERM_CACHE_MAX_ENTRIES = 4096
HIGHLIGHT_MAX_WORDS = 10
LOGGED_ISSUES_MAX = 20
STEM_KEY_CHARS = 4
LONG_NUMBER_DIGITS = 4  # a run this long is not something to read out on the phone
HIT_START, HIT_END = "\x02", "\x03"  # FTS5 highlight() markers, never present in product text

# Words that say nothing about the product, including phone-call filler ("show me", "looking").
STOP_WORDS = frozenset(
    """
    a about an and any are as at be but by can could do does for from get got have i i'd i'm
    im in is it its just let like looking me my need of on one or our please show some something
    that the them there these they this to us want wanted was we what which with would you your
    find buy needs tell know okay ok hi hello yes so well really very also
    """.split()
)

# Everyday words a catalog rarely uses, each with the words catalogs use instead.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "big": ("large",),
    "huge": ("large",),
    "large": ("big",),
    "small": ("compact",),
    "little": ("compact",),
    "tiny": ("compact",),
    "compact": ("small",),
    "silent": ("quiet",),
    "quiet": ("silent",),
    "fridge": ("refrigerator",),
    "cooker": ("range",),
    "stove": ("range",),
    "hoover": ("vacuum",),
    "tv": ("television",),
    "television": ("tv",),
    "bike": ("bicycle",),
    "bicycle": ("bike",),
    "laptop": ("notebook",),
    "cheap": ("budget",),
    "inexpensive": ("budget",),
}

_WORD = re.compile(r"[^\W_]+")
_CLAUSE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\x02?[A-Z])|[,;:()]\s*|\s+-\s+|(?i:\s+with\s+)")
_MARKED_WORD = re.compile(r"\x02([^\x03]*)\x03")
_UNSPEAKABLE = re.compile(
    rf"https?://|www\.|[{{}}\[\]<>|\\]|\d{{{LONG_NUMBER_DIGITS},}}|\S+@\S+", re.IGNORECASE
)

_SCHEMA = """
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    brand_key TEXT NOT NULL,
    price_after REAL NOT NULL,
    rate REAL NOT NULL
);
CREATE VIRTUAL TABLE products_fts USING fts5(
    name, brand, description, faqs, tokenize = 'porter unicode61'
);
"""


class CatalogError(Exception):
    """The catalog file cannot be used at all: unreadable, not JSON, wrong shape, no valid product."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"catalog {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CatalogIssue:
    """One problem in a rejected record (index from 0, in file order); good records still load.

    A record with several bad fields has one issue per field: count records with
    `records_with_issues`, not `len(issues)`.
    """

    index: int
    field: str
    message: str
    sku: str | None = None

    def __str__(self) -> str:
        return f"record {self.index}{self._sku_note()}, field {self.field}: {self.message}"

    def _sku_note(self) -> str:
        return f" (sku {self.sku!r})" if self.sku else ""


def records_with_issues(issues: Sequence[CatalogIssue]) -> list[str]:
    """One line per rejected record, its field problems joined, in file order."""
    by_record: dict[int, list[CatalogIssue]] = {}
    for issue in issues:
        by_record.setdefault(issue.index, []).append(issue)
    return [
        f"record {index}{found[0]._sku_note()}: "
        + "; ".join(f"{issue.field}: {issue.message}" for issue in found)
        for index, found in by_record.items()
    ]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A product that matched, its relevance (higher is better) and a short speakable reason."""

    product: Product
    score: float
    highlight: str


@dataclass(frozen=True, slots=True)
class _FileState:
    """What the file looked like when last read: cheap (stat) and exact (hash) change checks."""

    mtime_ns: int
    size: int


def parse_catalog(data: bytes, path: Path) -> tuple[list[Product], list[CatalogIssue]]:
    """Valid products in file order and one issue per bad record or duplicate SKU.

    Accepts a JSON list of Products or a ProductsCollection document. Raises CatalogError when
    the file is not JSON, has another shape, or holds no valid product.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(path, f"not valid JSON: {exc}") from None
    records = _records(document)
    if records is None:
        raise CatalogError(
            path,
            "expected a JSON list of products or a ProductsCollection document "
            f'({{"TextMessage": ..., "JsonData": {{"products": [...]}}}}), got {type(document).__name__}',
        )
    products: list[Product] = []
    issues: list[CatalogIssue] = []
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        try:
            product = Product.model_validate(record)
        except ValidationError as exc:
            sku = record.get("sku") if isinstance(record, dict) else None
            issues += [
                CatalogIssue(
                    index,
                    ".".join(str(p) for p in err["loc"]) or "(record)",
                    err["msg"],
                    sku if isinstance(sku, str) else None,
                )
                for err in exc.errors()
            ]
            continue
        key = product.sku.casefold()
        if key in first_index:
            message = f"duplicate sku {product.sku!r} (first in record {first_index[key]}); kept the first"
            issues.append(CatalogIssue(index, "sku", message, product.sku))
            continue
        first_index[key] = index
        products.append(product)
    if not products:
        detail = "; ".join(str(issue) for issue in issues[:3]) or "the product list is empty"
        raise CatalogError(path, f"no valid product ({len(records)} records): {detail}")
    return products, issues


def _records(document: Any) -> list[Any] | None:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        data = document.get("JsonData")
        if isinstance(data, dict) and isinstance(data.get("products"), list):
            products: list[Any] = data["products"]
            return products
    return None


def query_words(text: str) -> list[str]:
    """The words of a query that can say something about a product, lower-cased, in order."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) >= MIN_WORD_CHARS or w.isdigit()]
    return [w for w in words if w not in STOP_WORDS][:MAX_QUERY_WORDS]


def best_clause(marked: str, product: Product) -> str:
    """A short speakable reason to pick the product, taken from its description.

    `marked` is FTS5 highlight() output for the description. The clause wins that matches the
    most query words not already in the product's name (the caller hears the name anyway), then
    the one that repeats the name least, then the earliest. Clauses with links, codes, long
    numbers or the SKU are skipped because the caller would hear them read out.
    """
    stems = {_stem_key(w) for w in _WORD.findall(product.name.lower()) if len(w) >= MIN_PREFIX_CHARS}
    best, best_rank = "", (-sys.maxsize, 0)
    for raw in _CLAUSE_SPLIT.split(marked):
        clause = raw.replace(HIT_START, "").replace(HIT_END, "").strip(" .!?")
        if not clause or _UNSPEAKABLE.search(clause) or product.sku.casefold() in clause.casefold():
            continue
        hits = _MARKED_WORD.findall(raw)
        novel_hits = sum(_stem_key(w.lower()) not in stems for w in hits)
        repeats = len(stems.intersection(_stem_key(w) for w in _WORD.findall(clause.lower())))
        rank = (novel_hits - repeats, -repeats)
        if rank > best_rank:
            best, best_rank = clause, rank
    words = best.split()
    if len(words) > HIGHLIGHT_MAX_WORDS:
        best = " ".join(words[:HIGHLIGHT_MAX_WORDS])
    if words and words[0][1:].islower():
        best = best[0].lower() + best[1:]
    return best


def _stem_key(word: str) -> str:
    """A crude stem for comparing a description word with the name ("washing" ~ "washer")."""
    return word[:STEM_KEY_CHARS]


class _Index:
    """One immutable loaded catalog: an in-memory FTS5 database plus the parsed products.

    Built once, then only read; a reload builds a new one. The connection is shared across
    threads (check_same_thread=False), so every use holds `_lock`. It is never closed explicitly:
    a search may still hold the old index after a swap, and the GC closes it once nobody does.
    """

    def __init__(self, products: Sequence[Product], issues: Sequence[CatalogIssue]) -> None:
        self.issues = tuple(issues)
        self.products = tuple(products)
        self._by_id = dict(enumerate(products, start=1))
        self._by_sku = {p.sku.casefold(): p for p in products}
        self.brands = tuple(sorted({p.brand for p in products}, key=str.casefold))
        self._lock = threading.Lock()
        self._term_cache: dict[str, tuple[str, ...]] = {}
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} lacks FTS5, which the catalog needs: {exc}"
            ) from exc
        with self._conn:
            self._conn.execute(
                "INSERT INTO products_fts (products_fts, rank) VALUES ('rank', ?)",
                (f"bm25({', '.join(str(w) for w in COLUMN_WEIGHTS)})",),
            )
            self._conn.executemany(
                "INSERT INTO products (id, sku, brand_key, price_after, rate) VALUES (?, ?, ?, ?, ?)",
                [
                    (i, p.sku.casefold(), p.brand.casefold(), p.price_after_discount, p.rate)
                    for i, p in self._by_id.items()
                ],
            )
            self._conn.executemany(
                "INSERT INTO products_fts (rowid, name, brand, description, faqs) VALUES (?, ?, ?, ?, ?)",
                [(i, p.name, p.brand, p.description, _faq_text(p)) for i, p in self._by_id.items()],
            )
        self._words = sorted(
            {
                w
                for p in products
                for w in _WORD.findall(f"{p.name} {p.brand} {p.description} {_faq_text(p)}".lower())
                if len(w) >= MIN_PREFIX_CHARS and not w.isdigit()
            }
        )

    def get(self, skus: Iterable[str]) -> tuple[list[Product], list[str]]:
        found: list[Product] = []
        unknown: list[str] = []
        for sku in skus:
            product = self._by_sku.get(sku.strip().casefold())
            if product is None:
                unknown.append(sku)
            elif product not in found:
                found.append(product)
        return found, unknown

    def search(
        self,
        query: str,
        *,
        max_price: float | None,
        min_price: float | None,
        brand: str | None,
        min_rating: float | None,
        limit: int,
    ) -> list[SearchHit]:
        conditions: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("p.price_after <= ?", max_price),
            ("p.price_after >= ?", min_price),
            ("p.brand_key = ?", brand.strip().casefold() if brand else None),
            ("p.rate >= ?", min_rating),
        ):
            if value is not None:
                conditions.append(clause)
                params.append(value)
        limit = max(1, min(limit, MAX_LIMIT))
        with self._lock:
            terms = self._match_terms(query_words(query))
            if terms:
                match = " OR ".join(terms)
                where = " AND ".join(["products_fts MATCH ?", *conditions])
                ranked = self._conn.execute(
                    "SELECT f.rowid, f.rank FROM products_fts AS f JOIN products AS p "
                    f"ON p.id = f.rowid WHERE {where} ORDER BY f.rank, p.rate DESC LIMIT ?",
                    [match, *params, limit],
                ).fetchall()
                # highlight() only for the few winners: on every match it costs more than BM25.
                marked = dict(
                    self._conn.execute(
                        "SELECT rowid, highlight(products_fts, 2, char(2), char(3)) "
                        "FROM products_fts WHERE products_fts MATCH ? AND rowid IN "
                        f"({', '.join('?' * len(ranked))})",
                        [match, *(rowid for rowid, _ in ranked)],
                    ).fetchall()
                )
                return [self._hit(rowid, -rank, marked[rowid]) for rowid, rank in ranked]
            if not conditions:
                return []
            rows = self._conn.execute(
                f"SELECT p.id FROM products AS p WHERE {' AND '.join(conditions)} "
                "ORDER BY p.rate DESC, p.price_after LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [self._hit(rowid, 0.0, self._by_id[rowid].description) for (rowid,) in rows]

    def _hit(self, rowid: int, score: float, marked: str) -> SearchHit:
        product = self._by_id[rowid]
        return SearchHit(product, score, best_clause(marked, product))

    def _match_terms(self, words: list[str]) -> list[str]:
        """FTS5 query terms for the words: each word, its synonyms, or its closest known words."""
        terms: list[str] = []
        for word in words:
            for candidate in (word, *SYNONYMS.get(word, ())):
                for term in self._resolve(candidate):
                    if term not in terms:
                        terms.append(term)
        return terms

    def _resolve(self, word: str) -> tuple[str, ...]:
        cached = self._term_cache.get(word)
        if cached is not None:
            return cached
        resolved: tuple[str, ...] = ()
        exact = f'"{word}"'
        prefix = f'"{word}"*'
        if self._matches(exact):
            resolved = (exact,)
        elif len(word) >= MIN_PREFIX_CHARS and self._matches(prefix):
            resolved = (prefix,)
        elif not word.isdigit():
            close = difflib.get_close_matches(
                word, self._words, n=MAX_CORRECTIONS_PER_WORD, cutoff=TYPO_CUTOFF
            )
            resolved = tuple(f'"{c}"' for c in close)
        if len(self._term_cache) >= TERM_CACHE_MAX_ENTRIES:
            self._term_cache.clear()
        self._term_cache[word] = resolved
        return resolved

    def _matches(self, term: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM products_fts WHERE products_fts MATCH ? LIMIT 1", (term,)
        ).fetchone()
        return row is not None


def _faq_text(product: Product) -> str:
    return "\n".join(f"{faq.question} {faq.answer}" for faq in product.FAQS)


def _build(data: bytes, path: Path) -> _Index:
    products, issues = parse_catalog(data, path)
    return _Index(products, issues)


class Catalog:
    """A store's products, searchable, reloadable while serving.

    Searches are synchronous: on in-memory SQLite they take well under a millisecond for a
    catalog of thousands, cheaper than a thread hop. Reloads read and index the whole file, so
    `Stores.watch` (bot/stores.py) runs them in a worker thread.
    """

    def __init__(self, path: Path, index: _Index, state: _FileState, digest: str) -> None:
        self.path = path
        self._index = index
        self._state = state
        self._digest = digest
        self._reload_lock = threading.Lock()
        self._last_failure: tuple[_FileState | None, str] | None = None

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Load the catalog at start-up; raises CatalogError with the path and the reason."""
        path = Path(path)
        data, state = _read(path)
        index = _build(data, path)
        catalog = cls(path, index, state, hashlib.sha256(data).hexdigest())
        _log_loaded("catalog loaded", path, index)
        return catalog

    def __len__(self) -> int:
        return len(self._index.products)

    @property
    def issues(self) -> tuple[CatalogIssue, ...]:
        """What the last successful load skipped, by record index and field."""
        return self._index.issues

    @property
    def brands(self) -> tuple[str, ...]:
        return self._index.brands

    def search(
        self,
        query: str,
        *,
        max_price: float | None = None,
        min_price: float | None = None,
        brand: str | None = None,
        min_rating: float | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> list[SearchHit]:
        """Best matches first. Prices are after discount; `brand` ignores case.

        Any query word may match (OR); unknown words fall back to their closest catalog words.
        A query with no usable word (empty, only stop words, or nothing close to the catalog)
        returns nothing, unless filters are given: then the filtered products, best rated first.
        """
        return self._index.search(
            query,
            max_price=max_price,
            min_price=min_price,
            brand=brand,
            min_rating=min_rating,
            limit=limit,
        )

    def get(self, skus: Iterable[str]) -> tuple[list[Product], list[str]]:
        """(products found, in request order without repeats; SKUs not in the catalog)."""
        return self._index.get(skus)

    def reload_if_changed(self) -> bool:
        """Swap in the file's new contents if it changed and loads; True if swapped.

        Blocking (reads and indexes the file): call it from a worker thread. A missing, corrupt
        or empty file keeps the current catalog serving and is logged once per change.
        """
        with self._reload_lock:
            try:
                before = _stat(self.path)
                if before == self._state:
                    return False
                data, after = _read(self.path)
            except CatalogError as exc:
                self._reject(None, exc)
                return False
            if before != after:
                return False  # still being written: look again on the next poll
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                self._state = after
                return False
            try:
                index = _build(data, self.path)
            except CatalogError as exc:
                self._reject(after, exc)
                return False
            self._index = index
            self._state, self._digest, self._last_failure = after, digest, None
            _log_loaded("catalog reloaded", self.path, index)
            return True

    def _reject(self, state: _FileState | None, exc: CatalogError) -> None:
        failure = (state, exc.reason)
        if failure != self._last_failure:
            log.error(
                "catalog reload rejected, still serving the last good catalog: %s",
                exc,
                extra={"path": str(self.path), "products": len(self._index.products)},
            )
        self._last_failure = failure


def _log_loaded(event: str, path: Path, index: _Index) -> None:
    rejected = records_with_issues(index.issues)
    fields = {"path": str(path), "products": len(index.products), "skipped": len(rejected)}
    if not rejected:
        log.info(event, extra=fields)
        return
    log.warning(
        "%s, %d records skipped (first: %s)",
        event,
        len(rejected),
        rejected[0],
        extra={**fields, "issues": rejected[:LOGGED_ISSUES_MAX]},
    )


def _stat(path: Path) -> _FileState:
    try:
        st = path.stat()
    except OSError as exc:
        raise CatalogError(path, f"cannot read: {exc.strerror or exc}") from None
    return _FileState(st.st_mtime_ns, st.st_size)


def _read(path: Path) -> tuple[bytes, _FileState]:
    """The file's bytes and its state after reading (so a later write shows up as a change)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CatalogError(path, f"cannot read: {exc.strerror or exc}") from None
    return data, _stat(path)


def _format_hit(rank: int, hit: SearchHit) -> str:
    p = hit.product
    return (
        f"{rank:>2}. {p.name} | {p.brand} | ${p.price_after_discount:,.2f} | "
        f"{p.rate:g}/5 | {p.sku} | score {hit.score:.2f}"
    )


CLI_PROG = "python -m bot catalog"
CLI_ABOUT = (
    "Check or search a product catalog: a JSON list of products (or a ProductsCollection "
    "document) in the seed's format, described in the README's 'Catalog format' section."
)


def _cli_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=CLI_PROG, description=CLI_ABOUT)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{check,import,search}", help="what to do"
    )
    for name, about in (
        ("check", "check every record of FILE as the bot loads it; one line per bad record, exit 1 if any"),
        ("import", "the same check, under its earlier name"),
    ):
        checker = commands.add_parser(name, help=about, description=about)
        checker.add_argument("file", type=Path, help="the catalog JSON file")
    about = "search the catalog as the voice agent does; prices are after discount"
    find = commands.add_parser("search", help=about, description=about)
    find.add_argument("query", help="words as a caller would say them, e.g. 'quiet washer for a big family'")
    find.add_argument("--max-price", type=float, metavar="DOLLARS", help="highest price after discount")
    find.add_argument("--min-price", type=float, metavar="DOLLARS", help="lowest price after discount")
    find.add_argument("--brand", help="only this brand (any letter case)")
    find.add_argument("--min-rating", type=float, metavar="RATE", help="lowest rating, 0 to 5")
    find.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"most results to show (default {DEFAULT_LIMIT})"
    )
    find.add_argument("--catalog", type=Path, help="catalog file (default: CATALOG_PATH, else the sample)")
    return parser


def check_file(path: Path) -> int:
    """Prints the count, then one line per bad record; 0 when every record loads, else 1."""
    try:
        data, _ = _read(path)
        products, issues = parse_catalog(data, path)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rejected = records_with_issues(issues)
    print(f"{path}: {_count(len(products), 'product')} load, {_count(len(rejected), 'record')} skipped")
    for line in rejected:
        print(line)
    return 1 if rejected else 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def main(argv: list[str]) -> int:
    """`python -m bot catalog check FILE` and `python -m bot catalog search QUERY [filters]`."""
    parser = _cli_parser()
    args = parser.parse_args(argv)
    if args.command in ("check", "import"):
        return check_file(args.file)

    path: Path | None = args.catalog
    if path is None:
        from bot.settings import SettingsError, load_settings

        try:
            path = load_settings().catalog_path
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
    try:
        catalog = Catalog.load(path)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    hits = catalog.search(
        args.query,
        max_price=args.max_price,
        min_price=args.min_price,
        brand=args.brand,
        min_rating=args.min_rating,
        limit=args.limit,
    )
    if not hits:
        print("no match")
    for rank, hit in enumerate(hits, start=1):
        print(_format_hit(rank, hit))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
