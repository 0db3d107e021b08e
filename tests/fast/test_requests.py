"""How the API refuses a request body: where JSON breaks, strict types, and one message format
for every validation problem, the same in the API and in ``explain_validation_error``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from goldclone.fields import MIN_MEMORY_MB
from goldclone.models import (
    CreateVMRequest,
    HttpCheck,
    PoolRequest,
    ReadyWhen,
    TemplateRequest,
    UpdateVMRequest,
)
from goldclone.problems import explain_validation_error
from tests.fast.conftest import Service


async def post(service: Service, path: str, content: bytes) -> dict[str, Any]:
    response = await service.client.post(
        path, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_body_that_is_not_json_is_told_where_it_breaks(service: Service) -> None:
    trailing_comma = b'{\n  "cpus": 1,\n  "memory": 256,\n}'
    answer = await post(service, "/vms", trailing_comma)
    assert answer == {
        "code": "invalid-json",
        "message": "the body is not valid JSON: line 4, column 1: "
        "Expecting property name enclosed in double quotes",
    }
    answer = await post(service, "/images", b'{"url": "http://x/"')
    assert answer["code"] == "invalid-json"
    assert answer["message"].startswith("the body is not valid JSON: line 1, column 20: ")
    answer = await post(service, "/vms", b'{"cpus": "\xff"}')
    assert answer == {"code": "invalid-json",
                      "message": "the body is not valid JSON: it is not UTF-8 text"}  # fmt: skip


WHOLE_NUMBERS = [
    ("/vms", "cpus"), ("/vms", "memory"), ("/vms", "ttl"),
    ("/images/sha256-0/templates", "cpus"), ("/images/sha256-0/templates", "memory"),
    ("/pools/ci", "cpus"), ("/pools/ci", "size"),
]  # fmt: skip


@pytest.mark.parametrize("value", [2.0, "2", True])
async def test_a_whole_number_field_takes_only_an_integer(
    service: Service, request_body: dict[str, Any], value: object
) -> None:
    bodies = {
        "/vms": request_body,
        "/images/sha256-0/templates": {"cpus": 1, "memory": 256},
        "/pools/ci": {**request_body, "size": 1},
    }
    for path, field in WHOLE_NUMBERS:
        body = {**bodies[path], field: value}
        send = service.client.put if path.startswith("/pools") else service.client.post
        response = await send(path, json=body)
        assert response.status_code == 400, (path, field, response.text)
        assert response.json() == {
            "code": "invalid-request", "message": f"{field}: Input should be a valid integer"
        }, (path, field)  # fmt: skip
    for ready_when in ({"tcp": 22.0}, {"http": {"port": 80.0}}, {"tcp": 22, "timeout": 9.0},
                       {"guest_agent": value if value is not True else 1}):  # fmt: skip
        response = await service.client.post(
            "/vms", json={**request_body, "ready_when": ready_when}
        )
        assert response.status_code == 400, ready_when
        assert "Input should be a valid" in response.json()["message"], ready_when
    patch = await service.client.patch(f"/vms/{'0' * 8}-0000-0000-0000-{'0' * 12}",
                                       json={"ttl": value})  # fmt: skip
    assert (patch.status_code, patch.json()["message"]) == (
        400,
        "ttl: Input should be a valid integer",
    )
    assert (await service.client.get("/vms")).json()["vms"] == []


async def test_fields_are_named_one_way_and_messages_are_plain(
    service: Service, request_body: dict[str, Any]
) -> None:
    image = request_body["image"]
    cases = [
        ({**image, "checksum_type": "sha1"},
         "image.checksum: a sha1 checksum has 40 hex digits, not 64"),
        ({**image, "checksum": "z" * 64}, "image.checksum: must be hexadecimal"),
        ({**image, "url": "ftp://x/"}, "image.url: "),
        ({"url": image["url"]}, "image.checksum: is required"),
    ]  # fmt: skip
    for spec, message in cases:
        body = {**request_body, "image": spec}
        answer = (await service.client.post("/vms", json=body)).json()
        assert answer["code"] == "invalid-request"
        assert answer["message"].startswith(message), answer
        assert "Value error" not in answer["message"]
        with pytest.raises(ValidationError) as refused:
            CreateVMRequest.model_validate(body)
        assert explain_validation_error(refused.value) == answer["message"]
    several = {**request_body, "cpus": 1.5, "colour": "red"}
    answer = (await service.client.post("/vms", json=several)).json()
    assert answer["message"] == "cpus: Input should be a valid integer; colour: unknown field"


@pytest.mark.parametrize(
    ("model", "fields"),
    [(CreateVMRequest, ("cpus", "memory", "ttl")), (TemplateRequest, ("cpus", "memory")),
     (PoolRequest, ("cpus", "memory", "size")), (UpdateVMRequest, ("ttl",)),
     (ReadyWhen, ("tcp", "timeout")), (HttpCheck, ("port",))],
)  # fmt: skip
def test_a_client_refuses_a_float_for_a_whole_number_as_the_api_does(
    model: type[BaseModel], fields: tuple[str, ...]
) -> None:
    for name in fields:
        with pytest.raises(ValidationError) as refused:
            model.model_validate({name: 1.0})
        assert f"{name}: Input should be a valid integer" in explain_validation_error(refused.value)


async def test_a_vm_needs_the_memory_a_guest_boots_with(
    service: Service, request_body: dict[str, Any]
) -> None:
    too_little = await service.client.post("/vms", json={**request_body, "memory": 64})
    assert too_little.json() == {
        "code": "invalid-request",
        "message": f"memory: Input should be greater than or equal to {MIN_MEMORY_MB}",
    }
    assert (await service.boot({**request_body, "memory": MIN_MEMORY_MB}))["status"] == "running"
    schema = (await service.client.get("/openapi.json")).json()["components"]["schemas"]
    for model in ("CreateVMRequest", "TemplateRequest", "PoolRequest"):
        assert schema[model]["properties"]["memory"]["minimum"] == MIN_MEMORY_MB
