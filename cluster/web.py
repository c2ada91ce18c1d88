"""The search page and the passage view: server-rendered HTML over the data the JSON API returns.

Jinja2 templates in ``cluster/web/`` with autoescaping on: everything from a document is escaped,
and the query's terms are marked by the offsets the query core computed (the generation's keyword
analysis), never by matching HTML. The page works without JavaScript (a GET form, ``<details>``
for a file's other passages); ``static/shoal.js`` fetches and swaps pages in, and asks for the
bearer token once where the server wants one. Nothing is loaded from outside the server.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from markupsafe import Markup, escape

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"shoal.css": "text/css; charset=utf-8", "shoal.js": "text/javascript; charset=utf-8"}
FILE_TYPES = ("text", "markdown", "rst", "code", "data", "html", "pdf")
SCALES = {"hybrid": "score in [0, 1], 1 = the best of both sides", "dense": "cosine similarity in [-1, 1]",
          "keyword": "BM25 score, 0 and up"}


def marked(text: str, spans: Optional[Sequence[Sequence[int]]]) -> Markup:
    """``text`` escaped, with each (start, end) span in <mark>."""
    out, at = [], 0
    for a, b in sorted((int(a), int(b)) for a, b in spans or () if 0 <= a < b <= len(text)):
        if a < at:
            continue
        out += [escape(text[at:a]), Markup("<mark>"), escape(text[a:b]), Markup("</mark>")]
        at = b
    out.append(escape(text[at:]))
    return Markup("").join(out)


def context(p: dict[str, Any]) -> Markup:
    """A passage view's text: before, the passage (its own <mark class="passage" id="passage">), after; the
    query's terms marked inside all three (their offsets run over before + passage + after)."""
    before, passage, after = p["before"], p["passage"], p["after"]
    spans = p.get("highlights") or []
    a, b = len(before), len(before) + len(passage)

    def part(lo: int, hi: int, text: str) -> Markup:
        return marked(text, [(max(x, lo) - lo, min(y, hi) - lo) for x, y in spans if x < hi and y > lo])

    return Markup("").join([part(0, a, before), Markup('<mark class="passage" id="passage">'), part(a, b, passage),
                            Markup("</mark>"), part(b, b + len(after), after)])


@lru_cache(maxsize=1)
def environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(str(WEB)), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["marked"] = marked
    env.filters["context"] = context
    return env


def render(template: str, **data: Any) -> str:
    data.setdefault("needs_token", False)
    data.setdefault("token_refused", False)
    return environment().get_template(template).render(**data)


def search_page(*, q: str = "", mode: str = "hybrid", k: int = 10, path_prefix: Optional[str] = None,
                file_type: Optional[list[str]] = None, hits: Sequence[dict[str, Any]] = (),
                status: Optional[dict[str, Any]] = None, error: Optional[dict[str, str]] = None,
                ms: float = 0.0, partial: bool = False, missing: Sequence[int] = (), needs_token: bool = False,
                token_refused: bool = False) -> str:
    return render("search.html", q=q, mode=mode, k=k, path_prefix=path_prefix, file_types=FILE_TYPES,
                  selected_types=set(file_type or []), hits=list(hits), status=status, error=error, ms=ms,
                  partial=partial, missing=list(missing), scale=SCALES.get(mode, ""), needs_token=needs_token,
                  token_refused=token_refused)


def passage_page(p: dict[str, Any], q: Optional[str]) -> str:
    p = dict(p, mtime=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["mtime_ns"] / 1e9)))
    return render("passage.html", p=p, q=q or "")


def text_page(p: dict[str, Any], q: Optional[str]) -> str:
    """The whole extracted text of the passage's file (the passage view with all of it as context)."""
    return passage_page(p, q)


def error_page(title: str, detail: str, *, needs_token: bool = False, token_refused: bool = False) -> str:
    return render("error.html", title=title, detail=detail, needs_token=needs_token, token_refused=token_refused)


def static_file(name: str) -> tuple[bytes, str]:
    """(bytes, media type) of a file the page loads; KeyError for anything else."""
    media = STATIC[name]
    return (WEB / "static" / name).read_bytes(), media
