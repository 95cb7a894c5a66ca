"""The conversion report: one row per normalization site, printable and convertible to a dict.

Statuses: ``converted`` (or ``planned`` in a dry run), ``skipped`` (selected but left as is
for the reason given), ``excluded`` (not selected by include/exclude), ``unsupported`` (a norm
normsurgeon cannot read). A converted model carries its report as
``model.normsurgeon_report``; ``plan()`` returns one without converting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SiteRow:
    name: str
    source_type: str
    target: str | None
    status: str
    new_type: str | None = None
    exact: str | None = None
    transferred: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reason: str | None = None
    calls: int | None = None
    input_shape: tuple[int, ...] | None = None
    aliases: list[str] = field(default_factory=list)

    def rule(self) -> str:
        parts = []
        for label, names in (("transferred", self.transferred), ("reset", self.reset),
                             ("dropped", self.dropped)):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        return "; ".join(parts) or "nothing to transfer"


@dataclass
class ConversionReport:
    target: str
    model_type: str
    options: dict = field(default_factory=dict)
    rows: list[SiteRow] = field(default_factory=list)
    functional_sites: list[dict] = field(default_factory=list)
    trace: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    verify: str = "not run"
    dry_run: bool = False

    @property
    def verified(self) -> bool:
        """Whether the new modules were checked against their call sites (False: verification could not run)."""
        return not self.verify.startswith(("skipped", "not run"))

    def sites(self, status: str | None = None) -> list[SiteRow]:
        return [r for r in self.rows if status is None or r.status == status]

    @property
    def converted(self) -> list[SiteRow]:
        return self.sites("planned" if self.dry_run else "converted")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items()) or "no normalization sites"
        verb = "plan" if self.dry_run else "conversion"
        return f"normsurgeon {verb} of {self.model_type} to {self.target!r}: {len(self.rows)} sites ({counts})"

    def to_dict(self) -> dict:
        return {"target": self.target, "model_type": self.model_type, "options": self.options,
                "dry_run": self.dry_run, "counts": self.counts(), "verify": self.verify,
                "trace": self.trace, "shapes": self.shapes,
                "sites": [asdict(r) for r in self.rows], "functional_sites": self.functional_sites}

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    def table(self, max_rows: int | None = None) -> str:
        """The report as text; ``max_rows`` shortens the site table (rules and notes stay complete)."""
        rules: dict[str, str] = {}
        header = ("site", "source", "new", "status", "exact", "calls", "input", "rule")
        lines = [header]
        for i, r in enumerate(self.rows):
            if r.status in ("converted", "planned"):
                key = f"{r.source_type} → {r.new_type}: {r.rule()}"
                rule = rules.setdefault(key, chr(ord("A") + len(rules)) if len(rules) < 26 else str(len(rules)))
            else:
                rule = "-"
            if max_rows is not None and i >= max_rows:
                continue
            shape = "x".join(map(str, r.input_shape)) if r.input_shape else "?"
            lines.append((r.name, r.source_type, r.new_type or "-", r.status, r.exact or "-",
                          "?" if r.calls is None else str(r.calls), shape, rule))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = [self.summary(), ""]
        out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        if max_rows is not None and len(self.rows) > max_rows:
            out.append(f"... {len(self.rows) - max_rows} more sites")
        if rules:
            out += ["", "transfer rules:"] + [f"  {k}  {text}" for text, k in rules.items()]
        excluded = self.sites("excluded")
        notes = [(r.name, r.reason) for r in self.rows if r.reason and r.status != "excluded"]
        notes += [(r.name, n) for r in self.rows for n in r.notes]
        notes += [(r.name, "same module also at " + ", ".join(r.aliases)) for r in self.rows if r.aliases]
        notes += [(r.name, "excluded: not selected by include=/exclude=") for r in excluded]
        if notes:
            out += ["", "notes:"] + _grouped_notes(notes)
        for f in self.functional_sites:
            out.append(f"  functional {f['function']} in '{f['module']}': not converted "
                       f"({f.get('reason', 'a functional call has no module to swap')})")
        if self.trace.get("error"):
            out += ["", f"tracing: {self.trace['error']} (converted by module swap)"]
        for name, why in self.trace.get("leaves_added", {}).items():
            out.append(f"tracing: '{name}' treated as a leaf: {why}")
        out += ["", f"verify: {self.verify}"]
        return "\n".join(out)


def _grouped_notes(notes: list[tuple[str, str]], max_names: int = 3) -> list[str]:
    """One line per distinct note text; a note shared by several sites lists them once."""
    by_text: dict[str, list[str]] = {}
    for name, text in notes:
        by_text.setdefault(text, []).append(name)
    lines = []
    for text, names in by_text.items():
        if len(names) == 1:
            lines.append(f"  {names[0]}: {text}")
        else:
            shown = ", ".join(names[:max_names]) + (", ..." if len(names) > max_names else "")
            lines.append(f"  {len(names)} sites ({shown}): {text}")
    return lines
