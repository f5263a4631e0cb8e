"""Two commands recording into one run registry at the same moment: every entry is kept, ids are unique.

Each trial forks two writers that wait at a barrier and then call ``registry.record`` at once,
so both ask for the same id (``<UTC second>-<slug>-<kind>``) in the same second. Before ids
were reserved with an exclusive ``mkdir``, one entry was lost in every trial (issue 19).
"""

from __future__ import annotations

import json
import multiprocessing

from molting import registry
from molting.persona import Persona

TRIALS = 30
WRITERS = 2


def _writer(root: str, barrier, index: int) -> None:
    persona = Persona("Ana", "en", ["I am Ana."], ["calm"], "You are Ana.", "You are Ana.")
    barrier.wait(timeout=30)
    registry.record(root, persona, "eval", {"writer": index})


def test_two_writers_at_once_keep_every_entry_under_unique_ids(tmp_path):
    context = multiprocessing.get_context("fork")
    lost = []
    for trial in range(TRIALS):
        root = tmp_path / f"trial{trial}"
        barrier = context.Barrier(WRITERS)
        writers = [context.Process(target=_writer, args=(str(root), barrier, i)) for i in range(WRITERS)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=60)
        assert [w.exitcode for w in writers] == [0] * WRITERS, f"trial {trial}: a writer failed"
        entries = registry.list_ids(root)
        names = [p.name for p in root.iterdir()]
        writers_seen = sorted(json.loads((e / registry.ENTRY_FILE).read_text())["config"]["writer"] for e in entries)
        if writers_seen != list(range(WRITERS)):
            lost.append((trial, names))
        assert not [n for n in names if n.startswith(".")], f"trial {trial}: partial directories left: {names}"
    assert lost == [], f"{len(lost)} of {TRIALS} trials lost an entry: {lost[:3]}"


def test_a_failed_record_gives_its_reserved_id_back(tmp_path, monkeypatch):
    """An entry that fails while being written leaves neither its id's directory nor a partial one."""
    import pytest

    persona = Persona("Ana", "en", ["I am Ana."], ["calm"], "You are Ana.", "You are Ana.")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.Entry, "to_dict", fail)  # while entry.json is being written
    with pytest.raises(KeyboardInterrupt):
        registry.record(tmp_path / "runs", persona, "eval", {})
    assert list((tmp_path / "runs").iterdir()) == []
