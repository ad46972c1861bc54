"""The README's backend table and the registry agree: a claimed backend that is not registered fails (it is not
skipped), and so does a registered one the table hides."""
import re
from pathlib import Path

from elva_kernels import _dispatch

README = Path(__file__).resolve().parents[2] / "README.md"


def table() -> dict[str, dict[str, bool]]:
    """{op: {backend: claimed}} from the rows of the table under '## Backends today'."""
    section = README.read_text().split("## Backends today", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.split()[0] for cell in lines[0].strip("|").split("|")]  # "cpu (C++/OpenMP)" -> "cpu"
    claims = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        row = {backend: cell.startswith("yes") for backend, cell in zip(header[1:], cells[1:])}
        for op in re.findall(r"`(\w+)`", cells[0]):
            claims[op] = row
    return claims


def test_every_claimed_backend_is_registered_and_every_registered_one_is_claimed():
    claims = table()
    ops = set(_dispatch.ops())
    assert ops <= set(claims), f"ops missing from the README table: {sorted(ops - set(claims))}"
    problems = []
    for op in sorted(ops):
        registered = {b.name for b in _dispatch.backends(op)}
        for backend, claimed in claims[op].items():
            if claimed and backend not in registered:
                problems.append(f"{op}: the README claims a {backend} backend the registry lacks")
            if not claimed and backend in registered:
                problems.append(f"{op}: {backend} is registered but the README says it is not")
    assert not problems, "\n".join(problems)


def test_table_rows_name_registered_ops_or_their_wrappers():
    """A row names at least one registered op (sharded_similarity_topk shares similarity_topk's row)."""
    rows = {}
    section = README.read_text().split("## Backends today", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines()[1:]:
        if line.startswith("| `"):
            rows[line] = set(re.findall(r"`(\w+)`", line.split("|")[1]))
    for line, names in rows.items():
        assert names & set(_dispatch.ops()), f"a README row names no registered op: {line[:60]}"
