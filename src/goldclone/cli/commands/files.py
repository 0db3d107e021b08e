"""``goldclone cp``: files and folders to and from a guest."""

from __future__ import annotations

from pathlib import Path

from goldclone.cli.commands import CommandFailed, Context, UsageError
from goldclone.cli.exits import Exit


def cp(ctx: Context) -> Exit:
    """``cp LOCAL ID:PATH`` or ``cp ID:PATH LOCAL``: an argument is the guest's when a colon
    comes before any slash (as scp has it; ``./a:b`` is a local file)."""
    source, target = _remote(ctx.args.source), _remote(ctx.args.target)
    if (source is None) == (target is None):
        raise UsageError("give one side as ID:PATH (the VM's) and the other as a local path")
    try:
        if target is not None:
            vm, path = target
            ctx.api.copy_to(vm, Path(ctx.args.source), path)
            ctx.output.show(f"copied {ctx.args.source} to {vm}:{path}")
        else:
            assert source is not None
            vm, path = source
            if not path.startswith("/"):
                raise UsageError(f"{path}: the guest path must be absolute")
            where = ctx.api.copy_from(vm, path, Path(ctx.args.target))
            ctx.output.show(f"copied {vm}:{path} to {where}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise CommandFailed("local-error", f"{exc.filename or 'here'}: {exc.strerror}") from None
    return Exit.OK


def _remote(argument: str) -> tuple[str, str] | None:
    vm, colon, path = argument.partition(":")
    if not colon or "/" in vm:
        return None
    if not vm:
        raise UsageError(f"{argument}: name the VM before the colon")
    return vm, path
