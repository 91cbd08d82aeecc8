"""What a notebook claims about its measurements, checked without blanking the rest of the notebook.

A plain ``assert`` that fails stops the notebook: a learner sees no output after it, not even the figures that
would show why. A :class:`Claims` check records the claim with the numbers measured, prints whether it held,
and lets the notebook go on; the notebook's last cell calls :meth:`Claims.finish`, which shows every claim in one
table, writes it to ``build/claims/<notebook>.csv`` and raises :class:`ClaimNotReproduced` if any did not hold,
so ``make run`` and the notebook tests still fail on it.

Numbers that are a measurement rather than a claim (a difference smaller than the seed spread, say) go through
:meth:`Claims.measure`: shown and recorded, never failed.

Example:
    >>> claims = Claims("demo", write=False)
    >>> claims.check("8-bit PTQ is within 1 point of float", 0.004 <= 0.01, measured="-0.40 points")
    claim held: 8-bit PTQ is within 1 point of float (measured -0.40 points)
    >>> claims.finish()  # doctest: +ELLIPSIS
    1 of 1 claims held...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qatlab.files import build_dir, write_atomic


class ClaimNotReproduced(AssertionError):
    """Raised by :meth:`Claims.finish` when a claim a notebook makes did not hold in this run."""


@dataclass
class Claim:
    claim: str
    status: str  # "held", "NOT REPRODUCED" or "measured"
    measured: str
    expected: str


class Claims:
    """The claims of one notebook run, in the order they were made.

    Args:
        notebook: a name for the table and its file (``build/claims/<notebook>.csv``).
        write: write that file at :meth:`finish` (off for tests and doctests).
    """

    def __init__(self, notebook: str, write: bool = True) -> None:
        if not isinstance(notebook, str) or not notebook:
            raise ValueError(f"notebook={notebook!r} must be a non-empty name, e.g. '03_bn_folding'")
        self.notebook = notebook
        self.write = write
        self.rows: list[Claim] = []

    def check(self, claim: str, held: bool, measured: str = "", expected: str = "") -> None:
        """Record ``claim`` as held or not reproduced, with the ``measured`` numbers (and the ``expected``
        threshold, when the claim text does not say it); print one line. (Nothing is returned: a notebook cell
        ending in a check shows the line, not a bare ``True``.)"""
        held = bool(held)
        self.rows.append(Claim(claim, "held" if held else "NOT REPRODUCED", measured, expected))
        detail = ", ".join(
            p
            for p in (f"measured {measured}" if measured else "", f"expected {expected}" if expected else "")
            if p
        )
        print(
            f"{'claim held' if held else 'CLAIM NOT REPRODUCED'}: {claim}"
            + (f" ({detail})" if detail else "")
        )

    def measure(self, what: str, measured: str) -> None:
        """Record a number that is reported, not claimed (e.g. a difference within the noise)."""
        self.rows.append(Claim(what, "measured", measured, ""))
        print(f"measured: {what}: {measured}")

    def table(self):
        """Every claim and measurement so far as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(
            [asdict(r) for r in self.rows], columns=["claim", "status", "measured", "expected"]
        )

    @property
    def failed(self) -> list[Claim]:
        return [r for r in self.rows if r.status == "NOT REPRODUCED"]

    def finish(self) -> None:
        """Show the table, write it, and raise :class:`ClaimNotReproduced` when a claim did not hold."""
        table = self.table()
        if self.write:
            folder = build_dir() / "claims"
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"{self.notebook}.csv", table.to_csv(index=False))
        checked = [r for r in self.rows if r.status != "measured"]
        print(f"{len(checked) - len(self.failed)} of {len(checked)} claims held in this run")
        try:
            from IPython.display import display

            display(table)
        except ImportError:  # plain Python: the printed lines above carry the same content
            pass
        if self.failed:
            raise ClaimNotReproduced(
                f"{len(self.failed)} claim(s) of {self.notebook} not reproduced in this run: "
                + "; ".join(f"{r.claim} (measured {r.measured or '?'})" for r in self.failed)
                + ". The numbers are in the table above and in each claim's cell."
            )
