"""How a QEMU's end is read from its log (``drivers.qemu.launch``); no QEMU needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from goldclone.drivers.qemu.launch import ENDED, Ending, ending


@pytest.mark.parametrize(
    ("log", "words"),
    [
        ("", None),  # still running: nothing says it ended
        ("qemu: warning: x\n", None),
        (f"qemu: cannot open disk: boom\n{ENDED}3\n",
         Ending(False, "it exited with status 3: qemu: cannot open disk: boom")),
        (f"{ENDED}137\n", Ending(False, "it was killed by SIGKILL")),
        (f"qemu: warning: TCG\n{ENDED}0\n",
         Ending(True, "it exited normally (the guest powered off, or QEMU was told to quit)")),
        (f"{ENDED}1\nqemu: restarted and said this\n{ENDED}2\n",
         Ending(False, "it exited with status 2: qemu: restarted and said this")),
    ],
)  # fmt: skip
def test_the_last_words_of_a_qemu_are_how_it_ended_and_the_last_thing_it_said(
    tmp_path: Path, log: str, words: Ending | None
) -> None:
    path = tmp_path / "qemu.log"
    path.write_text(log)
    assert ending(path) == words
    assert ending(tmp_path / "none.log") is None
