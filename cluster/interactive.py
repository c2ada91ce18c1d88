"""`shoal search`: type a query, read the hits; `open N`, `full N`, `more`; `exit` to leave."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from shoal.index.errors import ShoalError

HELP = """commands:
  <words>     search for them
  open N      open hit N's file at its passage ($EDITOR +LINE, else $PAGER +LINE, else less)
  full N      print hit N's whole chunk
  more        the next hits of the last query
  help        this text
  exit, quit  leave (Ctrl-D too)"""

TEXT_KINDS = ("text", "markdown", "rst", "code", "data")


def line_of(path: str, kind: str, start: int) -> Optional[int]:
    """1-based line of character ``start`` in the file as it was read; None where offsets are not lines (PDF, HTML)."""
    if kind not in TEXT_KINDS:
        return None
    from shoal.workers.scan import SkipFile, read_text

    try:
        text, _, _ = read_text(path)
    except SkipFile:
        return None
    return text.count("\n", 0, max(0, start)) + 1


def open_command(path: str, line: Optional[int], env: Optional[dict[str, str]] = None) -> list[str]:
    """The command that shows ``path`` at ``line``: $EDITOR, else $PAGER, else less (`+LINE` for each)."""
    env = os.environ if env is None else env
    prog = shlex.split(env.get("EDITOR") or env.get("VISUAL") or env.get("PAGER") or "less")
    return [*prog, *([f"+{line}"] if line else []), path]


class Session:
    """The state of one interactive search: the last query and the hits shown so far."""

    def __init__(self, searcher: Any, k: int, search_kw: dict[str, Any], show: Callable[..., None],
                 out: Any = sys.stdout, err: Any = sys.stderr) -> None:
        self.s, self.k, self.kw, self.show = searcher, k, search_kw, show
        self.out, self.err = out, err
        self.query: Optional[str] = None
        self.hits: list[Any] = []

    def _hit(self, arg: str) -> Any:
        if not self.hits:
            raise ShoalError("no hits yet: search first")
        try:
            n = int(arg)
        except ValueError:
            raise ShoalError(f"expected a hit number from 1 to {len(self.hits)}, got {arg!r}") from None
        if not 1 <= n <= len(self.hits):
            raise ShoalError(f"no hit {n}: the hits shown are 1 to {len(self.hits)}")
        return self.hits[n - 1]

    def search(self, q: str) -> None:
        t0 = time.perf_counter()
        [hits] = self.s.search([q], k=self.k, **self.kw)
        self.query, self.hits = q, hits
        self.show(hits)
        print(f"  ({len(hits)} hits in {(time.perf_counter() - t0) * 1000:.0f} ms)", file=self.out, flush=True)

    def more(self) -> None:
        if self.query is None:
            raise ShoalError("no query yet: search first")
        n = len(self.hits)
        [hits] = self.s.search([self.query], k=min(n + self.k, 1000), **self.kw)
        new = hits[n:]
        if not new:
            print("  (no more hits)", file=self.out, flush=True)
            return
        self.hits = hits
        self.show(new)

    def full(self, arg: str) -> None:
        h = self._hit(arg)
        print(h.text, file=self.out, flush=True)

    def open(self, arg: str) -> None:
        h = self._hit(arg)
        if not os.path.isfile(h.path):
            raise ShoalError(f"{h.path} is not there any more (or not on this machine)")
        cmd = open_command(h.path, line_of(h.path, h.kind, h.start))
        try:
            subprocess.call(cmd)
        except FileNotFoundError as e:
            raise ShoalError(f"cannot run {cmd[0]!r}: set $EDITOR or $PAGER") from e

    def handle(self, line: str) -> bool:
        """One input line; False when the user leaves."""
        q = line.strip()
        if not q:
            return True
        word, _, arg = q.partition(" ")
        cmd = word.lower()
        if cmd in ("exit", "quit", ":q"):
            return False
        try:
            if cmd == "help" and not arg:
                print(HELP, file=self.out, flush=True)
            elif cmd == "more" and not arg:
                self.more()
            elif cmd in ("open", "full") and arg.strip().isdigit():
                getattr(self, cmd)(arg.strip())
            else:
                self.search(q)
        except ShoalError as e:
            print(f"shoal: {e}", file=self.err, flush=True)
        return True


def run(session: Session, interactive: bool) -> None:
    while True:
        try:
            line = input("shoal> " if interactive else "shoal> \n")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not session.handle(line):
            break
