"""GitLab Runner's custom executor, played as the runner plays it (GitLab Runner cannot be
installed here): ``config``, ``prepare``, ``run SCRIPT STAGE`` for each stage and ``cleanup``,
each a process of its own with the job's variables as ``CUSTOM_ENV_*`` and the runner's exit
codes in ``BUILD_FAILURE_EXIT_CODE`` and ``SYSTEM_FAILURE_EXIT_CODE``, following GitLab's
documentation of the custom executor. The VM is a synthetic one whose guest is the real
helper on this host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.fast.conftest import as_, image_of
from tests.harness import Goldclone
from tests.servers import FileServer
from tests.serving import GOLDCLONE

BUILD_FAILURE, SYSTEM_FAILURE = 7, 8
STAGES = ("prepare_script", "get_sources", "step_script", "after_script")


class Runner:
    """The runner's side of one job: its environment, its scripts, and what each stage's
    process printed and exited with."""

    def __init__(self, server: Goldclone, folder: Path, job_id: int, image: str) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "GOLDCLONE_URL": str(server.client.base_url),
            "GOLDCLONE_TOKEN": as_("alice")["Authorization"][7:],
            "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE),
            "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE),
            "CUSTOM_ENV_CI_JOB_ID": str(job_id),
            "CUSTOM_ENV_CI_JOB_IMAGE": image,
        }
        self.images = folder / "images.toml"

    async def stage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One stage's process, in a thread: the server answers from this test's loop."""
        return await asyncio.to_thread(
            subprocess.run, [*GOLDCLONE, "gitlab-executor", *args], env=self.env, text=True,
            capture_output=True, timeout=120,
        )  # fmt: skip

    async def job(self, scripts: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
        """The runner's sequence: config, prepare, each stage's script until one fails (then
        after_script still), and cleanup always."""
        done = {"config": await self.stage("config")}
        done["prepare"] = await self.stage("prepare", "--images", str(self.images))
        failed = done["prepare"].returncode != 0
        for stage in STAGES:
            if (failed and stage != "after_script") or done["prepare"].returncode != 0:
                continue
            script = self.folder / f"{stage}.sh"
            script.write_text(scripts.get(stage, "true\n"))
            done[stage] = await self.stage("run", str(script), stage)
            failed = failed or done[stage].returncode != 0
        done["cleanup"] = await self.stage("cleanup")
        return done


def images_file(runner: Runner, images: FileServer) -> None:
    image = image_of(images)
    runner.images.write_text(
        f'[images.demo]\nimage = {{ url = "{image["url"]}", checksum = "{image["checksum"]}" }}\n'
        "cpus = 1\nmemory = 256\n"
    )


async def vms_left(server: Goldclone) -> list[Any]:
    return list((await server.client.get("/vms")).json()["vms"])


async def test_a_job_that_passes(
    helper_server: Goldclone, tmp_path: Path, images: FileServer
) -> None:
    runner = Runner(helper_server, tmp_path, 4101, "demo")
    images_file(runner, images)
    done = await runner.job({"step_script": 'echo "building in $(pwd)"; echo warning >&2\n'})
    assert json.loads(done["config"].stdout)["driver"]["name"] == "goldclone"
    assert done["prepare"].returncode == 0, done["prepare"].stderr
    assert "for this job" in done["prepare"].stdout
    for stage in STAGES:
        assert done[stage].returncode == 0, (stage, done[stage].stderr)
    assert done["step_script"].stdout.startswith("building in ")
    assert done["step_script"].stderr == "warning\n"
    assert done["cleanup"].returncode == 0
    assert await vms_left(helper_server) == []


async def test_a_job_whose_script_fails_exits_with_the_build_failure_code(
    helper_server: Goldclone, tmp_path: Path, images: FileServer
) -> None:
    runner = Runner(helper_server, tmp_path, 4102, "demo")
    images_file(runner, images)
    done = await runner.job(
        {"step_script": "echo compiling; exit 3\n", "after_script": "echo after\n"}
    )
    assert done["step_script"].returncode == BUILD_FAILURE
    assert done["step_script"].stdout == "compiling\n"
    assert done["after_script"].returncode == 0 and done["after_script"].stdout == "after\n"
    assert done["cleanup"].returncode == 0
    assert await vms_left(helper_server) == []


async def test_a_job_whose_vm_cannot_be_made_exits_with_the_system_failure_code(
    helper_server: Goldclone, tmp_path: Path, images: FileServer
) -> None:
    runner = Runner(helper_server, tmp_path, 4103, "no-such-image")
    images_file(runner, images)
    done = await runner.job({})
    assert done["prepare"].returncode == SYSTEM_FAILURE
    assert "'no-such-image' is neither pool:NAME nor in the images file" in done["prepare"].stderr
    assert "step_script" not in done and done["cleanup"].returncode == 0
    # an image whose checksum does not match: the VM is made, fails, and is deleted at once
    bad = image_of(images)
    runner.images.write_text(
        f'[images.demo]\nimage = {{ url = "{bad["url"]}", checksum = "{"0" * 64}" }}\n'
    )
    runner.env["CUSTOM_ENV_CI_JOB_IMAGE"] = "demo"
    done = await runner.job({})
    assert done["prepare"].returncode == SYSTEM_FAILURE
    assert "checksum-mismatch" in done["prepare"].stderr
    assert done["cleanup"].returncode == 0
    assert await vms_left(helper_server) == []


async def test_a_job_from_a_warm_pool(
    helper_server: Goldclone, tmp_path: Path, images: FileServer
) -> None:
    pool = {"image": image_of(images), "cpus": 1, "memory": 256, "disk_size": 1, "size": 1}
    root = {"Authorization": as_("root")["Authorization"]}
    response = await helper_server.client.put("/pools/ci", json=pool, headers=root)
    assert response.status_code in (200, 201), response.text
    await helper_server.wait_pool("ci", 1)
    runner = Runner(helper_server, tmp_path, 4104, "pool:ci")
    done = await runner.job({"step_script": "echo pooled\n"})
    assert "from pool" in done["prepare"].stdout, done["prepare"]
    assert done["step_script"].stdout == "pooled\n"
    assert done["cleanup"].returncode == 0
    assert await vms_left(helper_server) == []
    assert (await helper_server.client.delete("/pools/ci", headers=root)).status_code == 204
