"""The revision board: seqlock writes, sharing between processes through the file, repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from authhook.revision import IDENTITY_SLOT, SLOT_COUNT, RevisionBoard, tenant_slot


def test_a_write_moves_its_slots_through_odd_to_a_new_even_value() -> None:
    board = RevisionBoard()
    slot = tenant_slot("acme")
    before = board.read(slot)
    with board.writing([slot]):
        assert board.read(slot) % 2 == 1
        assert board.sequence() % 2 == 1
    assert board.read(slot) % 2 == 0 and board.read(slot) > before
    assert board.sequence() % 2 == 0


def test_a_failed_write_still_moves_its_slots() -> None:
    board = RevisionBoard()
    slot = tenant_slot("acme")
    before = board.read(slot)
    with pytest.raises(RuntimeError), board.writing([slot]):
        raise RuntimeError("rollback")
    assert board.read(slot) > before


def test_two_boards_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    first, second = RevisionBoard(tmp_path / "b.rev"), RevisionBoard(tmp_path / "b.rev")
    with first.writing([IDENTITY_SLOT]):
        assert second.read(IDENTITY_SLOT) % 2 == 1
    assert second.read(IDENTITY_SLOT) == first.read(IDENTITY_SLOT) == 2
    first.close()
    second.close()


def test_repair_evens_out_a_dead_writers_counters(tmp_path: Path) -> None:
    board = RevisionBoard(tmp_path / "b.rev")
    board._write(0, 7)
    board._write(5, 3)
    assert board.repair()
    assert board.sequence() == 8 and board.read(5) == 4
    assert not board.repair()
    board.close()


def test_tenant_slots_are_stable_and_in_range() -> None:
    assert tenant_slot("acme") == tenant_slot("acme")
    assert all(2 <= tenant_slot(f"t{i}") <= SLOT_COUNT for i in range(1000))
