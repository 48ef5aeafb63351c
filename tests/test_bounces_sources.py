"""mailer/bounces/sources.py: mbox and Maildir sources, open_source's dispatch and errors."""

from __future__ import annotations

import mailbox
import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from mailer.bounces import sources
from mailer.bounces.sources import (
    BounceSource,
    MaildirSource,
    MboxSource,
    SourceError,
    SourceOptions,
    open_source,
)
from mailer.core.errors import ExitCode


def _message(number: int, body: str = "") -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example\nTo: bounces@acme.example\nSubject: report {number}\n"
        f"Message-ID: <r{number}@mx.example>\n\n{body or f'body {number}'}\n"
    ).encode()


def _write_mbox(path: Path, messages: list[bytes], *, dates: list[str] | None = None) -> None:
    with path.open("wb") as handle:
        for index, raw in enumerate(messages):
            when = dates[index] if dates else "Wed Dec  2 14:00:11 2026"
            handle.write(f"From MAILER-DAEMON {when}\n".encode())
            handle.write(raw.replace(b"\nFrom ", b"\n>From "))
            handle.write(b"\n")


def test_mbox_yields_each_message_with_its_offset_and_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bounces.mbox"
    messages = [_message(n) for n in range(3)] + [_message(3, "line one\nFrom the start, an escaped line\n")]
    _write_mbox(path, messages)
    got = list(MboxSource(path))
    assert [m.raw for m in got] == messages
    data = path.read_bytes()
    for message in got:
        assert data[int(message.ref) :].startswith(b"From MAILER-DAEMON")
    assert len({m.ref for m in got}) == 4
    # the stdlib agrees on the split (it leaves >From escaped; we unescape, mboxrd)
    stdlib = [bytes(m) for m in mailbox.mbox(path)]
    assert stdlib[:3] == [m.raw for m in got][:3]
    assert stdlib[3].replace(b">From", b"From") == got[3].raw


def test_mbox_body_line_from_without_blank_line_before_does_not_split(tmp_path: Path) -> None:
    path = tmp_path / "m.mbox"
    path.write_bytes(b"From a Wed Dec  2 14:00:11 2026\nSubject: x\n\nhello\nFrom here on, unescaped\n\n")
    got = list(MboxSource(path))
    assert len(got) == 1
    assert b"From here on" in got[0].raw


def test_mbox_refs_are_stable_when_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "m.mbox"
    _write_mbox(path, [_message(1), _message(2)])
    first = [m.ref for m in MboxSource(path)]
    with path.open("ab") as handle:
        handle.write(b"From x Wed Dec  2 15:00:00 2026\n" + _message(3) + b"\n")
    second = [m.ref for m in MboxSource(path)]
    assert second[:2] == first and len(second) == 3


def test_mbox_since_selects_by_the_from_line_date_and_keeps_unreadable_dates(tmp_path: Path) -> None:
    path = tmp_path / "m.mbox"
    _write_mbox(
        path,
        [_message(1), _message(2), _message(3)],
        dates=["Mon Nov 30 23:59:59 2026", "Tue Dec  1 00:00:00 2026", "garbage"],
    )
    got = list(MboxSource(path, SourceOptions(since=date(2026, 12, 1))))
    assert [m.raw for m in got] == [_message(2), _message(3)]


def test_mbox_huge_message_is_cut_and_flagged_and_the_next_one_is_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "MAX_MESSAGE_BYTES", 1000)
    path = tmp_path / "m.mbox"
    huge = _message(1, "x" * 300_000)  # one line far longer than a read chunk
    _write_mbox(path, [huge, _message(2)])
    got = list(MboxSource(path))
    assert got[0].truncated and len(got[0].raw) <= 1000 and huge.startswith(got[0].raw)
    assert not got[1].truncated and got[1].raw == _message(2)


def test_empty_and_garbage_mbox_yield_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mbox"
    empty.write_bytes(b"")
    assert list(MboxSource(empty)) == []
    junk = tmp_path / "junk.mbox"
    junk.write_bytes(b"\x00\xff not an mbox at all\n")
    assert list(MboxSource(junk)) == []


def _maildir(tmp_path: Path, count: int) -> Path:
    root = tmp_path / "Maildir"
    box = mailbox.Maildir(root, create=True)
    for n in range(count):
        box.add(mailbox.MaildirMessage(_message(n)))
    return root


def test_maildir_reads_new_and_cur_and_refs_are_unique_names(tmp_path: Path) -> None:
    root = _maildir(tmp_path, 3)
    got = list(MaildirSource(root))
    assert sorted(m.raw for m in got) == sorted(_message(n) for n in range(3))
    assert {m.ref for m in got} == set(os.listdir(root / "new"))


def test_maildir_without_options_changes_nothing(tmp_path: Path) -> None:
    root = _maildir(tmp_path, 2)
    before = sorted(os.listdir(root / "new"))
    source = MaildirSource(root)
    source.mark_processed([m.ref for m in source])
    assert sorted(os.listdir(root / "new")) == before


def test_maildir_mark_seen_moves_to_cur_with_s_flag_and_ref_survives(tmp_path: Path) -> None:
    root = _maildir(tmp_path, 3)
    source = MaildirSource(root, SourceOptions(mark_seen=True))
    got = list(source)
    source.mark_processed([got[0].ref, got[1].ref])
    cur = sorted(os.listdir(root / "cur"))
    assert cur == sorted(f"{m.ref}:2,S" for m in got[:2])
    assert os.listdir(root / "new") == [got[2].ref]
    # the refs stay the same once in cur/
    assert {m.ref for m in MaildirSource(root)} == {m.ref for m in got}


def test_maildir_move_to_subfolder(tmp_path: Path) -> None:
    root = _maildir(tmp_path, 2)
    source = MaildirSource(root, SourceOptions(move_to="Processed"))
    got = list(source)
    source.mark_processed([got[0].ref, "not-a-ref"])
    moved = os.listdir(root / ".Processed" / "cur")
    assert moved == [f"{got[0].ref}:2,S"]
    assert [m.ref for m in MaildirSource(root)] == [got[1].ref]
    assert [m.raw for m in MaildirSource(root / ".Processed")] == [got[0].raw]


def test_maildir_since_uses_the_file_time(tmp_path: Path) -> None:
    root = _maildir(tmp_path, 2)
    names = sorted(os.listdir(root / "new"))
    old = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    os.utime(root / "new" / names[0], (old, old))
    got = list(MaildirSource(root, SourceOptions(since=date(2026, 6, 1))))
    assert [m.ref for m in got] == [names[1]]


def test_open_source_dispatches_on_the_spec(tmp_path: Path) -> None:
    mbox_path = tmp_path / "m.mbox"
    _write_mbox(mbox_path, [_message(1)])
    root = _maildir(tmp_path, 1)
    assert isinstance(open_source(str(mbox_path)), MboxSource)
    assert isinstance(open_source(str(root)), MaildirSource)
    assert isinstance(open_source(str(root)), BounceSource)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing.mbox", "no such file or directory"),
        (lambda tmp: tmp, "not a Maildir folder"),
        (lambda tmp: Path("ftp://host/box"), "unknown kind of source"),
    ],
)
def test_open_source_bad_specs_are_usage_errors(tmp_path: Path, make, expected: str) -> None:
    spec = "ftp://host/box" if "ftp" in str(make(tmp_path)) else str(make(tmp_path))
    with pytest.raises(SourceError) as caught:
        open_source(spec)
    assert expected in str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE


def test_mbox_refuses_options_that_would_rewrite_it(tmp_path: Path) -> None:
    path = tmp_path / "m.mbox"
    _write_mbox(path, [_message(1)])
    for options in (SourceOptions(mark_seen=True), SourceOptions(move_to="Done")):
        with pytest.raises(SourceError, match="cannot change it"):
            open_source(str(path), options)


def test_imap_spec_without_imap_module_is_a_clear_usage_error() -> None:
    try:
        import mailer.bounces.imap  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="IMAP"):
            open_source("imaps://user@127.0.0.1/INBOX")
    else:
        pytest.skip("the IMAP source exists; its own tests cover it")
