"""sd_py.serve's OpenAI images API without Ray: validation, error shapes and the official `openai`
client against the route logic over a fake model (the real Serve is in test_serve_ray.py)."""

import asyncio
import base64
import io

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sd_py import _serve_openai as oa
from sd_py import serve
from serve_fakes import FakeModel, app_with, png_bytes


def test_validate_generation_gives_n_requests_with_consecutive_seeds():
    body = {"prompt": "a cat", "n": 3, "size": "64x96", "seed": 7, "steps": 2, "guidance_scale": 3, "sampler": "Euler a"}
    requests = oa.validate_generation({**body, "model": "dall-e-2", "user": "u1", "response_format": "b64_json"})
    assert [r["seed"] for r in requests] == [7, 8, 9]
    assert {(r["width"], r["height"], r["steps"], r["guidance_scale"], r["sampler"]) for r in requests} == {(64, 96, 2, 3.0, "Euler a")}
    # The requests batch together in the model deployment.
    assert serve.group_requests(requests) == [[0, 1, 2]]
    one = oa.validate_generation({"prompt": "a cat"})
    assert len(one) == 1 and (one[0]["width"], one[0]["height"]) == (768, 768) and "sampler" not in one[0]


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": "a cat", "response_format": "url"}, "response_format", "not supported"),
        ({"prompt": "a cat", "response_format": "jpeg"}, "response_format", "must be one of"),
        ({"prompt": "a cat", "n": 0}, "n", "from 1 to 10"),
        ({"prompt": "a cat", "n": 11}, "n", "from 1 to 10"),
        ({"prompt": "a cat", "n": True}, "n", "from 1 to 10"),
        ({"prompt": "a cat", "size": "64"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "a cat", "size": "65x64"}, "size", "multiple of 8"),
        ({"prompt": "a cat", "size": 64}, "size", "WIDTHxHEIGHT"),
        ({"prompt": 5}, "prompt", "string"),
    ],
)
def test_validate_generation_refuses_in_openai_shape(body, param, message):
    with pytest.raises(oa.OpenAIError, match=message) as info:
        oa.validate_generation(body)
    assert info.value.param == param and info.value.status_code == 400


def test_shared_validation_and_model_errors_become_openai_errors():
    for error, status, kind in [
        (serve.BadRequest("steps must be between 1 and 500, got 0"), 400, "invalid_request_error"),
        (serve.PayloadTooLarge("image is over 8 bytes"), 413, "invalid_request_error"),
        (serve.ModelError("unknown scheduler", 422, "bad_request"), 400, "invalid_request_error"),
        (serve.ModelError("image generation failed: boom", 500, "error"), 500, "server_error"),
    ]:
        response = oa.as_openai_error(error).response()
        assert response.status_code == status
        if "steps" in str(error):
            assert b'"param":"steps"' in response.body
        assert response.body.startswith(b'{"error":{"message":"') and kind.encode() in response.body


def test_openai_mask_reads_transparency_as_repaint():
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))
    assert list(oa.openai_mask(mask).get_flattened_data()) == [0, 255, 0, 0, 0, 0, 0, 0]
    opaque = Image.new("RGBA", (4, 2), (255, 255, 255, 255))  # no transparency: white = repaint
    assert set(oa.openai_mask(opaque).get_flattened_data()) == {255}


def _client(model):
    from openai import AsyncOpenAI

    transport = httpx.ASGITransport(app=app_with(model))
    http_client = httpx.AsyncClient(transport=transport, base_url="http://serve")
    return AsyncOpenAI(api_key="unused", base_url="http://serve/v1", http_client=http_client, max_retries=0)


def test_openai_client_generates_and_reads_errors():
    import openai

    model = FakeModel()

    async def run():
        client = _client(model)
        out = await client.images.generate(prompt="a cat", n=2, size="64x64", extra_body={"seed": 5, "steps": 2})
        with pytest.raises(openai.BadRequestError) as info:
            await client.images.generate(prompt="a cat", response_format="url")
        model.fail = RuntimeError("out of memory")
        with pytest.raises(openai.InternalServerError) as failed:
            await client.images.generate(prompt="a cat", size="64x64")
        return out, info.value, failed.value

    out, refused, failed = asyncio.run(run())
    assert out.created > 0 and len(out.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert ["Seed: 5," in images[0].info["parameters"], "Seed: 6," in images[1].info["parameters"]] == [True, True]
    assert refused.status_code == 400 and refused.body["param"] == "response_format"
    assert refused.body["type"] == "invalid_request_error"
    assert failed.status_code == 500 and "out of memory" in failed.body["message"]


def test_edits_route_resizes_and_converts_the_mask():
    model = FakeModel()
    client = TestClient(app_with(model))
    mask = Image.new("RGBA", (75, 61), (0, 0, 0, 0))  # all transparent: repaint everything
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    files = {"image": ("i.png", png_bytes((75, 61)), "image/png"), "mask": ("m.png", buf.getvalue(), "image/png")}
    r = client.post("/v1/images/edits", data={"prompt": "a cat", "n": "2", "size": "72x64", "seed": "3"}, files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    first = model.requests[0]
    assert (first["width"], first["height"], first["strength"]) == (72, 64, 1.0)
    assert first["image"].size == first["mask"].size == (72, 64) and set(first["mask"].get_flattened_data()) == {255}
    assert [r["seed"] for r in model.requests] == [3, 4]
    # Without a mask: image-to-image at the image's size rounded down.
    r = client.post("/v1/images/edits", data={"prompt": "a cat"}, files={"image": files["image"]})
    assert r.status_code == 200 and model.requests[-1]["mask"] is None and model.requests[-1]["width"] == 72
    r = client.post("/v1/images/edits", data={"prompt": "a cat"}, files={"image": ("i.png", b"nope", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]


def test_models_lists_the_served_model(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "/models/sd2")
    assert oa.models() == {"object": "list", "data": [{"id": "/models/sd2", "object": "model", "created": 0, "owned_by": "sd_py"}]}


@pytest.mark.parametrize(
    "error, status, code",
    [
        ("overloaded", 503, "rate_limit_exceeded"),
        ("lost replica", 503, None),
        ("non-finite", 500, None),
    ],
)
def test_model_failures_keep_imagine_status_in_openai_shape(error, status, code):
    """Overload and a lost replica are 503 with Retry-After as on /imagine, in OpenAI's shape."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    model = FakeModel()
    model.fail = {
        "overloaded": BackPressureError(num_queued_requests=16, max_queued_requests=16),
        "lost replica": ActorDiedError(),
        "non-finite": FloatingPointError("non-finite values after step 2 of the UNet"),
    }[error]
    r = TestClient(app_with(model)).post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "n": 2})
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == code
    assert (r.headers.get("retry-after") == str(serve.RETRY_AFTER_S)) == (status == 503)


def test_past_the_deadline_is_504_in_openai_shape(monkeypatch):
    monkeypatch.setenv("SD_REQUEST_TIMEOUT_S", "1")
    model = FakeModel()
    model.delay_s = 30
    r = TestClient(app_with(model)).post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
    assert r.status_code == 504
    assert r.json()["error"] == {"message": "no image within SD_REQUEST_TIMEOUT_S (1 s)", "type": "server_error", "param": None, "code": "timeout"}
