"""Nothing received is unpickled: the packages never call pickle or torch.load."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["server", "client", "strategies", "privacy", "simulations", "task"]
FORBIDDEN = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|cloudpickle|"
                       r"dill\.loads?\(|marshal\.loads?\(|yaml\.load\(")


def test_no_unsafe_deserialisation_in_the_packages():
    hits = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "unsafe deserialisation:\n" + "\n".join(hits)
