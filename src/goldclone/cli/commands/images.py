"""The image commands: images [list], images pull, images build, images push, images
delete."""

from __future__ import annotations

from goldclone.cli.commands import Context, UsageError, reported
from goldclone.cli.commands.vms import OCI, image_fields, validated
from goldclone.cli.exits import Exit
from goldclone.image_spec import ImageSpec
from goldclone.models import ImageBuild, ImagePush, ImageStatus


def images(ctx: Context) -> Exit:
    action = ctx.args.image_command or "list"
    actions = {"list": _list, "pull": _pull, "build": _build, "push": _push, "delete": _delete}
    return actions[action](ctx)


def _list(ctx: Context) -> Exit:
    from goldclone.cli.display import image_table

    found = ctx.api.images()
    ctx.output.listing("images", found, image_table(found))
    return Exit.OK


def _pull(ctx: Context) -> Exit:
    args = ctx.args
    spec = validated(ImageSpec, image_fields({}, args).get("image", {}))
    image = ctx.api.pull_image(spec)
    if not args.wait:
        ctx.output.show(f"{image.id} {image.status.value}")
        ctx.output.value(image)
        return Exit.OK
    if ctx.output.json:
        image = ctx.api.wait_until_ready(image.id, args.timeout)
    else:
        from goldclone.cli.display import WaitDisplay

        with WaitDisplay(ctx.output.console) as display:
            image = ctx.api.wait_until_ready(image.id, args.timeout, display.update_image)
        ctx.output.show(image.id)
    ctx.output.value(image)
    return Exit.OK


def _build(ctx: Context) -> Exit:
    args = ctx.args
    fields = {"name": args.name, "push": _reference(args.push) if args.push else None,
              "chunk_mb": args.chunk_mb}  # fmt: skip
    build = validated(ImageBuild, {k: v for k, v in fields.items() if v is not None})
    image = ctx.api.make_image(args.vm, build)
    ctx.output.show(f"{image.id} {image.oci}" if image.oci else image.id)
    ctx.output.value(image)
    return Exit.OK


def _push(ctx: Context) -> Exit:
    args = ctx.args
    fields = {"oci": _reference(args.reference), "chunk_mb": args.chunk_mb}
    pushed = ctx.api.push_image(
        args.id, validated(ImagePush, {k: v for k, v in fields.items() if v is not None})
    )
    ctx.output.show(pushed.oci)
    ctx.output.value(pushed)
    return Exit.OK


def _reference(argument: str) -> str:
    if not argument.startswith(OCI):
        raise UsageError(f"a registry reference is written {OCI}REGISTRY/REPOSITORY:TAG")
    return argument.removeprefix(OCI)


def _delete(ctx: Context) -> Exit:
    args = ctx.args
    if bool(args.id) == args.failed:
        raise UsageError("give the image's ID, or --failed")
    if args.id:
        ids = [args.id]
    else:
        ids = [image.id for image in ctx.api.images() if image.status is ImageStatus.ERROR]
    for image_id in ids:
        ctx.api.delete_image(image_id)
    return reported(ctx, "deleted", "deleted", ids)
