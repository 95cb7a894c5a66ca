"""A progress display: a tqdm bar on stderr when it is a terminal, else a few plain lines."""
from __future__ import annotations

import sys


class Progress:
    """``update(k, **postfix)`` advances by k and shows postfix values (loss, throughput...);
    ``update_to(n)`` moves to n (a time budget: ``total`` in seconds, ``n`` the seconds spent)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
                 enabled: bool = True):
        self.desc, self.total, self.unit, self.n, self._bar = desc, total, unit, initial, None
        self.enabled, self.postfix = enabled, {}
        self._shown = 10 * initial // total if total else -1
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if enabled and tqdm is not None and getattr(sys.stderr, "isatty", lambda: False)():
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True, initial=initial)

    def _tail(self) -> str:
        return "".join(f", {k} {v}" for k, v in self.postfix.items())

    def update(self, k: int = 1, **postfix) -> None:
        self.n += k
        if postfix:
            self.postfix = {key: (f"{v:.4g}" if isinstance(v, float) else v) for key, v in postfix.items()}
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(k)
        elif self.total:
            tenth = 10 * self.n // self.total
            if tenth > self._shown and self.n < self.total:  # close() prints the last line
                self._shown = tenth
                print(f"{self.desc}: {self.n}/{self.total} {self.unit}{self._tail()}", file=sys.stderr, flush=True)
        elif self.n == 1 or self.n % 50 == 0:
            print(f"{self.desc}: {self.n} {self.unit}{self._tail()}", file=sys.stderr, flush=True)

    def update_to(self, n: int, **postfix) -> None:
        """Advance to ``n`` (never backwards); with only new postfix values, refresh them."""
        self.update(max(0, n - self.n), **postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.enabled:
            print(f"{self.desc}: {self.n}{'/' + str(self.total) if self.total else ''} {self.unit}"
                  f"{self._tail()}, done", file=sys.stderr, flush=True)
