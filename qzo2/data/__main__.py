"""`python -m qzo2.data`: the built-in offline datasets written as JSON Lines files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..outputs import write_file
from .corpora import chatterbot_rows, plot_or_review_rows, sentiment_rows

USAGE = ("usage: python -m qzo2.data chatterbot OUT.jsonl   (instruction-tuning conversations)\n"
         "       python -m qzo2.data sentiment OUT_DIR [SEED]     (Rotten Tomatoes splits as {text, label} rows)\n"
         "       python -m qzo2.data plot-or-review OUT_DIR [SEED]  (plot summary vs review, a held-out task)")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomically write rows as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3) or argv[0] not in ("chatterbot", "sentiment", "plot-or-review"):
        sys.exit(USAGE)
    out = Path(argv[1])
    if argv[0] == "chatterbot":
        rows = chatterbot_rows()
        write_jsonl(out, rows)
        print(f"wrote {len(rows)} conversations to {out}")
    else:
        seed = int(argv[2]) if len(argv) == 3 else 0
        splits = (sentiment_rows if argv[0] == "sentiment" else plot_or_review_rows)(seed)
        for name, rows in splits.items():
            write_jsonl(out / f"{name}.jsonl", rows)
        print(f"wrote {', '.join(f'{len(r)} {n}' for n, r in splits.items())} rows to {out}/")


if __name__ == "__main__":
    main(sys.argv[1:])
