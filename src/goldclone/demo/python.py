"""The host's own Python in the demo guest, for goldclone's helper (``guest.helper``): the
interpreter and the libraries it loads, and a zip of just the standard library modules the
helper imports, compiled by that interpreter (Python finds its library in
``PREFIX/lib/pythonXY.zip``)."""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import tempfile
from dataclasses import dataclass

from goldclone.errors import GoldcloneError
from goldclone.host.commands import run

PYTHON = pathlib.Path("/usr/bin/python3")
HELPER = "usr/lib/goldclone/helper.py"
"""Where the helper is in the guest."""
TIMEOUT = 60.0

# Run by the guest's interpreter: import the helper as the guest will, and say what that
# loaded, and where this Python keeps its library.
_PROBE = """
import sys
sys.path[:0] = [sys.argv[1]]
import helper, json
files = sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))})
print(json.dumps({"files": files, "prefix": sys.prefix, "version": sys.version_info[:2]}))
"""
_COMPILE = """
import json, py_compile, sys, tempfile, zipfile
stdlib, out, sources = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with zipfile.ZipFile(out, "w") as archive, tempfile.TemporaryDirectory() as tmp:
    for source in sources:
        name = source[len(stdlib) + 1 : -3] + ".pyc"
        compiled = py_compile.compile(source, cfile=f"{tmp}/c.pyc", dfile=name, doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(compiled, "rb") as f:
            archive.writestr(info, f.read())
"""


@dataclass(frozen=True)
class GuestPython:
    """Files for the guest: ``programs`` (host paths, copied to the same paths: the
    interpreter, the extension modules the helper loads, and their libraries) and ``made``
    (guest path: content)."""

    programs: list[pathlib.Path]
    made: dict[str, bytes]
    links: dict[str, str]


async def guest_python() -> GuestPython:
    if not PYTHON.exists():
        raise GoldcloneError(f"{PYTHON} is missing: install python3 (the demo guest runs it)")
    interpreter = PYTHON.resolve()
    helper_dir = importlib.resources.files("goldclone.guest")
    helper = helper_dir.joinpath("helper.py").read_bytes()
    with tempfile.TemporaryDirectory(prefix="goldclone-python-") as tmp:
        (pathlib.Path(tmp) / "helper.py").write_bytes(helper)
        _, out, _ = await run(str(interpreter), "-S", "-I", "-c", _PROBE, tmp, timeout=TIMEOUT)
        probe = json.loads(out)
        major, minor = probe["version"]
        stdlib = f"{probe['prefix']}/lib/python{major}.{minor}"
        files = [f for f in probe["files"] if f.startswith(stdlib + "/")]
        sources = [f for f in files if f.endswith(".py")]
        archive = pathlib.Path(tmp) / "stdlib.zip"
        await run(str(interpreter), "-S", "-I", "-c", _COMPILE, stdlib, str(archive),
                  json.dumps(sources), timeout=TIMEOUT)  # fmt: skip
        library = archive.read_bytes()
    extensions = [pathlib.Path(f) for f in files if f.endswith(".so")]
    zip_path = f"{probe['prefix']}/lib/python{major}{minor}.zip".lstrip("/")
    return GuestPython(
        programs=await with_libraries([interpreter, *extensions]),
        made={zip_path: library, HELPER: helper},
        links={"usr/bin/python3": interpreter.name},
    )


async def with_libraries(programs: list[pathlib.Path]) -> list[pathlib.Path]:
    """``programs`` and every shared library each loads (as ``ldd`` finds them), once each."""
    found = dict.fromkeys(programs)
    for program in programs:
        _, out, _ = await run("ldd", str(program), timeout=TIMEOUT)
        for line in out.splitlines():
            # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux... (0x...)"
            fields = line.split()
            path = fields[2] if len(fields) > 2 and fields[1] == "=>" else fields[0]
            if path.startswith("/"):
                found.setdefault(pathlib.Path(path))
    return list(found)
