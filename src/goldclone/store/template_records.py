"""Memory templates: each host's own, one per image and shape, with the machine still making
it."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.models import Template, TemplateStatus
from goldclone.shape import Shape
from goldclone.store.tables import templates as _templates


async def add(conn: AsyncConnection, host_id: str, template: Template, machine: str) -> Template:
    """Record a template that ``machine`` is making on ``host_id``, unless one of the same
    image and shape is recorded there already: then that one is returned and nothing is
    recorded."""
    query = select(_templates.c.template).where(
        _templates.c.image_key == template.image_id,
        _in_shape(Shape.of(template)),
        _templates.c.host_id == host_id,
    )
    if (row := (await conn.execute(query)).first()) is not None:
        return Template.model_validate(row.template)
    await conn.execute(_templates.insert().values(
        id=template.id, image_key=template.image_id, cpus=template.cpus,
        memory=template.memory, disk_size=template.disk_size, status=template.status.value,
        template=template.model_dump(mode="json"), machine=machine, host_id=host_id,
    ))  # fmt: skip
    return template


async def put(conn: AsyncConnection, template: Template, machine: str | None = None) -> None:
    """Write ``template``'s new state; ``machine`` is the one still making it, if any."""
    await conn.execute(
        _templates.update()
        .where(_templates.c.id == template.id)
        .values(
            status=template.status.value,
            template=template.model_dump(mode="json"),
            machine=machine,
        )
    )


async def of_host(
    conn: AsyncConnection, host_id: str, image_key: str | None = None
) -> list[tuple[Template, str | None]]:
    """``host_id``'s templates (of ``image_key``), oldest first, with the machine making
    each."""
    query = (
        select(_templates.c.template, _templates.c.machine)
        .where(_templates.c.host_id == host_id)
        .order_by(_templates.c.seq)
    )
    if image_key is not None:
        query = query.where(_templates.c.image_key == image_key)
    return [
        (Template.model_validate(row.template), row.machine) for row in await conn.execute(query)
    ]


async def forget(conn: AsyncConnection, template_id: str) -> None:
    await conn.execute(_templates.delete().where(_templates.c.id == template_id))


async def ready_in_shape(conn: AsyncConnection, shape: Shape) -> set[tuple[str, str]]:
    """The hosts and images (``(host_id, image_key)``) that have a ready template of this
    shape."""
    query = select(_templates.c.host_id, _templates.c.image_key).where(
        _templates.c.status == TemplateStatus.READY.value, _in_shape(shape)
    )
    return {(row.host_id, row.image_key) for row in await conn.execute(query)}


def _in_shape(shape: Shape) -> ColumnElement[bool]:
    disk = _templates.c.disk_size
    return and_(
        _templates.c.cpus == shape.cpus,
        _templates.c.memory == shape.memory,
        disk.is_(None) if shape.disk_size is None else disk == shape.disk_size,
    )


async def machines(conn: AsyncConnection, host_id: str) -> set[str]:
    """The machines making ``host_id``'s templates."""
    query = select(_templates.c.machine).where(
        _templates.c.machine.is_not(None), _templates.c.host_id == host_id
    )
    return {row.machine for row in await conn.execute(query)}
