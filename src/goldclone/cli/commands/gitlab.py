"""``goldclone gitlab-executor``: GitLab Runner's custom executor (``integrations.gitlab``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from goldclone.cli.commands import Context, UsageError
from goldclone.client import ClientError
from goldclone.integrations import gitlab


def gitlab_executor(ctx: Context) -> int:
    """A script that failed exits with the runner's ``BUILD_FAILURE_EXIT_CODE``, goldclone's
    own failure (said on stderr, which the job's log shows) with ``SYSTEM_FAILURE_EXIT_CODE``."""
    args, env = ctx.args, os.environ
    build_failure = _code(env, "BUILD_FAILURE_EXIT_CODE", 1)
    system_failure = _code(env, "SYSTEM_FAILURE_EXIT_CODE", 2)
    try:
        if args.stage == "config":
            print(json.dumps(gitlab.config()), flush=True)
        elif args.stage == "prepare":
            request = gitlab.request_for(ctx.api, env, args.images, args.default_image)
            gitlab.prepare(ctx.api, request, sys.stdout.buffer)
        elif args.stage == "run":
            if len(args.rest) != 2:
                raise UsageError("run takes the runner's SCRIPT and STAGE")
            script, stage = args.rest
            if gitlab.run(ctx.api, gitlab.vm_name(env), Path(script), stage) != 0:
                return build_failure
        else:
            gitlab.cleanup(ctx.api, gitlab.vm_name(env))
    except (gitlab.SystemFailure, ClientError) as exc:
        print(f"goldclone: {exc}", file=sys.stderr, flush=True)
        return system_failure
    return 0


def _code(env: os._Environ[str], name: str, default: int) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else default
