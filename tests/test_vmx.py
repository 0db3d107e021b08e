"""The .vmx reader and writer: byte-exact round trips, and edits that touch one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goldclone.images.vmx import VmxFile, read_vmx

SAMPLE = (
    b'.encoding = "UTF-8"\r\n'
    b'config.version = "8"\r\n'
    b"# a comment, kept\r\n"
    b"\r\n"
    b'displayName = "Build |22agent|22 #1"\r\n'
    b'annotation = "line one|0Aline two|0Abase64: aGVsbG8gd29ybGQ="\r\n'
    b'guestinfo.userdata = "e30K=="\r\n'
    b'scsi0:0.fileName = "Windows 10 x64.vmdk"\r\n'
    b'ScSi0:0.Present = "TRUE"\r\n'
    b"this line does not parse\r\n"
    b"memsize = 2048   \r\n"
    b'unterminated = "oops\r\n'
    b'RemoteDisplay.vnc.enabled="FALSE"'
)


def test_a_file_round_trips_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmx"
    path.write_bytes(SAMPLE)
    assert read_vmx(path).to_bytes() == SAMPLE


def test_values_are_unquoted_and_unescaped() -> None:
    vmx = VmxFile.parse(SAMPLE)
    assert vmx.get("displayName") == 'Build "agent" #1'
    assert vmx.get("annotation") == "line one\nline two\nbase64: aGVsbG8gd29ybGQ="
    assert vmx.get("guestinfo.userdata") == "e30K=="
    assert vmx.get("memsize") == "2048"
    assert vmx.get("remotedisplay.VNC.enabled") == "FALSE"
    assert vmx.get("unterminated") is None
    assert vmx.get("missing") is None


def test_keys_are_case_insensitive_and_listed_as_first_written() -> None:
    vmx = VmxFile.parse(SAMPLE)
    assert vmx.get("SCSI0:0.FILENAME") == "Windows 10 x64.vmdk"
    assert vmx.keys() == [
        ".encoding",
        "config.version",
        "displayName",
        "annotation",
        "guestinfo.userdata",
        "scsi0:0.fileName",
        "ScSi0:0.Present",
        "memsize",
        "RemoteDisplay.vnc.enabled",
    ]


def test_set_replaces_the_value_in_place() -> None:
    vmx = VmxFile.parse(SAMPLE)
    vmx.set("MEMSIZE", "4096")
    vmx.set("displayName", 'say "hi" | bye\n')
    expected = SAMPLE.replace(b"memsize = 2048   ", b'memsize = "4096"   ').replace(
        b'"Build |22agent|22 #1"', b'"say |22hi|22 |7C bye|0A"'
    )
    assert vmx.to_bytes() == expected
    assert VmxFile.parse(expected).get("displayName") == 'say "hi" | bye\n'


def test_set_appends_a_new_key_with_the_file_line_ending() -> None:
    vmx = VmxFile.parse(SAMPLE)
    vmx.set("numvcpus", "4")
    assert vmx.to_bytes() == SAMPLE + b'\r\nnumvcpus = "4"\r\n'
    assert VmxFile.parse(vmx.to_bytes()).get("numvcpus") == "4"


def test_set_on_an_empty_file() -> None:
    vmx = VmxFile()
    vmx.set("memsize", "512")
    assert vmx.to_bytes() == b'memsize = "512"\n'


@pytest.mark.parametrize("key", ["bad key", "a=b", "#x", 'q"', "clé", ""])
def test_set_rejects_a_key_that_would_not_parse(key: str) -> None:
    with pytest.raises(ValueError, match=r"not a valid .vmx key"):
        VmxFile().set(key, "x")


def test_delete_removes_every_line_of_a_key() -> None:
    vmx = VmxFile.parse(b'a = "1"\nb = "2"\nA = "3"\n# a = "4"\n')
    assert "A" in vmx
    assert list(vmx) == ["a", "b"]
    vmx.delete("a")
    assert "a" not in vmx
    vmx.delete("not there")
    assert vmx.to_bytes() == b'b = "2"\n# a = "4"\n'


def test_the_last_of_duplicate_keys_counts_and_set_updates_all() -> None:
    vmx = VmxFile.parse(b'a = "1"\nA = "2"\n')
    assert vmx.get("a") == "2"
    vmx.set("a", "3")
    assert vmx.to_bytes() == b'a = "3"\nA = "3"\n'


def test_values_follow_the_file_encoding() -> None:
    data = b'.encoding = "windows-1252"\r\ndisplayName = "caf\xe9"\r\n'
    vmx = VmxFile.parse(data)
    assert vmx.get("displayName") == "café"
    vmx.set("annotation", "naïve")
    assert vmx.to_bytes() == data + b'annotation = "na\xefve"\r\n'


def test_bytes_that_do_not_decode_survive_a_get_and_set() -> None:
    data = b'displayName = "\xff\xfe"\n'
    vmx = VmxFile.parse(data)
    vmx.set("displayName", vmx.get("displayName") or "")
    assert vmx.to_bytes() == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_round_trip(data: bytes) -> None:
    assert VmxFile.parse(data).to_bytes() == data


_KEYS = st.from_regex(r"[A-Za-z.][A-Za-z0-9_.:\-]{0,20}", fullmatch=True)
_VALUES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30).map(
    lambda text: text.replace("\r", "").replace("\n", "")
)


@st.composite
def _vmx_lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["entry", "spaced", "unquoted", "comment", "blank", "junk"]))
    key, value = draw(_KEYS), draw(_VALUES)
    if kind == "entry":
        return f'{key} = "{value}"'
    if kind == "spaced":
        return f'\t{key}="{value}==" '
    if kind == "unquoted":
        return f"{key} = {value.strip()}"
    if kind == "comment":
        return f"# {value}"
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t"]))
    return value


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_vmx_lines(), max_size=25),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)
def test_generated_vmx_files_round_trip(lines: list[str], newline: str, final: bool) -> None:
    data = (newline.join(lines) + (newline if final else "")).encode()
    assert VmxFile.parse(data).to_bytes() == data


@settings(max_examples=300, deadline=None)
@given(st.lists(_vmx_lines(), max_size=15), _KEYS, _VALUES)
def test_set_then_get_gives_the_value_and_keeps_other_lines(
    lines: list[str], key: str, value: str
) -> None:
    original = VmxFile.parse("\n".join(lines).encode())
    edited = VmxFile.parse(original.to_bytes())
    edited.set(key, value)
    reparsed = VmxFile.parse(edited.to_bytes())
    assert reparsed.get(key) == value
    for other in original:
        if other.lower() != key.lower():
            assert reparsed.get(other) == original.get(other)
    reparsed.delete(key)
    assert reparsed.get(key) is None
