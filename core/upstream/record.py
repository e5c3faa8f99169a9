"""What `apply` did to a clone, kept inside its .git folder (never in the work tree).

The commits on the project branch are the real record; this file says which pinned commit and which
series (file names + SHA-256) produced the branch tip, so that a second `apply` can tell "already
applied" from "series changed" from "someone committed on the branch".
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

RECORD_NAME = "deqfusion-applied.json"


@dataclass
class Record:
    upstream: str
    commit: str                  # the pinned commit the branch starts from
    branch: str
    head: str                    # the branch tip the series produced
    series: List[Tuple[str, str]] = field(default_factory=list)  # (file name, sha256)
    three_way: bool = False      # whether `git am --3way` was needed
    excluded: List[str] = field(default_factory=list)  # paths left out: their content is missing in the source

    def matches(self, commit: str, series: List[Tuple[str, str]]) -> bool:
        return self.commit == commit and [tuple(s) for s in self.series] == [tuple(s) for s in series]


def record_path(git_dir: Path) -> Path:
    return Path(git_dir) / RECORD_NAME


def read_record(git_dir: Path) -> Optional[Record]:
    path = record_path(git_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["series"] = [tuple(s) for s in data.get("series", [])]
        return Record(**data)
    except (OSError, ValueError, TypeError):
        return None  # absent or from an incompatible version: treated as "no record"


def write_record(git_dir: Path, record: Record) -> None:
    path = record_path(git_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
