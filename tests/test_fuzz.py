"""schemathesis against the real server's own /openapi.json, stateful where links allow, on the
synthetic driver (the API does not depend on the driver, and so the test needs no root).

The number of examples is bounded and the seed fixed, so that a CI run is repeatable; set
GOLDCLONE_FUZZ_EXAMPLES and GOLDCLONE_FUZZ_SEED to explore further.

Every check runs but ``positive_data_acceptance``: the server refuses some requests that the
schema allows for reasons no schema can state, such as a URL whose address the outbound
policy forbids (``http://0``), and it says so with a 400 at once. ``GET /events`` is left
out: its answer is a stream that never ends by design (``tests/test_fleet.py`` reads it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.serving import GOLDCLONE, free_port, serving

EXAMPLES = os.environ.get("GOLDCLONE_FUZZ_EXAMPLES", "50")
SEED = os.environ.get("GOLDCLONE_FUZZ_SEED", "20261126")
REQUEST_TIMEOUT = 60
"""Seconds; schemathesis's default of 10 was once passed in CI by a DELETE, which answers once
its VM is gone: after a guest's clean shutdown, that is up to GOLDCLONE_SHUTDOWN_TIMEOUT (10 s)
and the teardown. A failure shows the server's log with the report."""


def test_schemathesis_finds_no_server_error_or_schema_violation(workdir: Path) -> None:
    port = free_port()
    # a fuzzed oci reference names a registry that is not there: that is a 502 by design
    config = workdir / "schemathesis.toml"
    config.write_text("".join(
        f'[[operations]]\ninclude-name = "{name}"\n'
        'checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502"]\n'
        for name in ("POST /vms", "POST /images", "PUT /pools/{name}", "POST /vms/{vm_id}/image",
                     "POST /images/{image_id}/push")
    ))  # fmt: skip
    argv = [*GOLDCLONE, "serve", "--port", str(port), "--data-dir", str(workdir / "fuzz")]
    env = {"GOLDCLONE_DRIVER": "synthetic", "GOLDCLONE_DOWNLOAD_TIMEOUT": "2",
           "GOLDCLONE_CALLBACK_SCHEDULE": "0"}  # fmt: skip
    with serving(argv, env, port) as log:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
             f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--exclude-operation-id", "events",
             # a tar body, which schemathesis cannot make (tests/fast/test_files.py sends them)
             "--exclude-operation-id", "put_files",
             "--max-examples", EXAMPLES, "--seed", SEED, "--no-color",
             "--request-timeout", str(REQUEST_TIMEOUT)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"{report}\nthe server's log:\n{log.text()}"
    # A fuzzed server never has a ready gold image, so POST /images/{id}/templates, PATCH
    # /images/{id} and DELETE of a template never get past their 404 or 400; and its one host
    # is up, so DELETE /hosts/{id} answers 404 or 409: schemathesis's two coverage heuristics
    # warn about those operations, and only those.
    warnings = report.partition("\nWarnings:\n")[2].partition("\n\n")[0].splitlines()
    expected = re.compile(
        r"(Missing test data: \d operations? repeatedly returned 404 responses"
        r"|Schema validation mismatch: \d operations? mostly rejected generated data)"
    )
    unexpected = [w for w in warnings if w.strip(" ⚠️") and not expected.fullmatch(w.strip(" ⚠️"))]
    assert "No issues found" in report or not unexpected, report
    # (a fuzzed path names nothing in a guest: GET /vms/{id}/files answers path-not-found; a
    # fuzzed VM is mostly gone or failed when POST /vms/{id}/image comes: 404 or 409)
    never_succeed = ("POST /images/{image_id}/templates", "PATCH /images/{image_id}",
                     "POST /images/{image_id}/push", "POST /vms/{vm_id}/image",
                     "DELETE /images/{image_id}/templates/{template_id}",
                     "DELETE /hosts/{host_id}", "GET /vms/{vm_id}/files")  # fmt: skip
    # and a fuzzed registry reference, valid by the schema, mostly names an address the
    # outbound policy refuses (a 400 at once, as no schema can say) or none at all (a 502)
    mostly_refused = {"Missing test data": never_succeed,
                      "Schema validation mismatch": (*never_succeed, "POST /vms")}  # fmt: skip
    for heading, allowed in mostly_refused.items():
        if heading in report:
            section = report.partition(heading)[2].partition("\nSchema validation")[0]
            named = [line.strip()[2:] for line in section.splitlines() if line.startswith("  - ")]
            assert named and set(named) <= set(allowed), section
    assert "Traceback" not in log.text(), log.text()
