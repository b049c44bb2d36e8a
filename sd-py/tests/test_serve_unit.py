"""sd_py.serve without Ray running: request validation, upload decoding and batch grouping."""

import re

import pytest

from sd_py.serve import BadRequest, MAX_STEPS, group_requests, validate_request


def test_validate_request_defaults():
    r = validate_request("a cat", 768)
    assert r["prompt"] == "a cat" and r["height"] == r["width"] == 768
    assert 1 <= r["steps"] <= MAX_STEPS
    assert r["guidance_scale"] == 7.5
    assert 0 <= r["seed"] < 2**63
    assert r["negative_prompt"] is None
    assert validate_request("a cat", 64, seed=5, steps=3, guidance_scale=2, negative_prompt="dog") == {
        "prompt": "a cat",
        "negative_prompt": "dog",
        "height": 64,
        "width": 64,
        "steps": 3,
        "guidance_scale": 2.0,
        "seed": 5,
    }


@pytest.mark.parametrize(
    "args",
    [
        ("", 64),
        (None, 64),
        ("  \n", 64),
        ("cat", 65),
        ("cat", 56),
        ("cat", 2056),
        ("cat", "x"),
        ("cat", 64, None, 0),
        ("cat", 64, None, MAX_STEPS + 1),
        ("cat", 64, None, "many"),
        ("cat", 64, None, None, float("inf")),
        ("cat", 64, None, None, -1),
        ("cat", 64, -5),
        ("cat", 64, 2**64),
    ],
)
def test_validate_request_rejects(args):
    with pytest.raises(BadRequest) as info:
        validate_request(*args)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_group_requests():
    reqs = [
        validate_request("a", 64, 1, 3),
        validate_request("b", 64, 2, 3),
        validate_request("c", 128, 3, 3),
        validate_request("d", 64, 4, 3, negative_prompt="x"),
        validate_request("e", 64, 5, 4),
        validate_request("f", 64, 6, 3, guidance_scale=1.0),
    ]
    assert group_requests(reqs) == [[0, 1, 3], [2], [4], [5]]


def _png_bytes(size, mode="RGB", fmt="PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


def test_decode_upload_reads_images_in_the_asked_mode():
    from sd_py.serve import decode_upload

    image = decode_upload("image", _png_bytes((75, 61), "RGBA"), "RGB")
    assert image.mode == "RGB" and image.size == (75, 61)
    assert decode_upload("mask", _png_bytes((75, 61), fmt="JPEG"), "L").mode == "L"


def test_decode_upload_refuses_what_it_must_not_decode():
    import sd_py.serve as s

    for data, message in [
        (b"", "empty"),
        (b"not an image", "not an image"),
        (_png_bytes((64, 64), fmt="GIF"), "not an image"),  # a format outside UPLOAD_FORMATS
        (_png_bytes((64, 64))[:60], "could not be decoded"),  # truncated after the header
    ]:
        with pytest.raises(s.BadRequest, match=message) as info:
            s.decode_upload("image", data, "RGB")
        assert info.value.status_code == 422
    # The header alone decides: 4096 x 4096 is refused before any pixel is decoded.
    with pytest.raises(s.PayloadTooLarge, match="4096x4096") as info:
        s.decode_upload("image", _png_bytes((4096, 4096)), "RGB")
    assert info.value.status_code == 413
    with pytest.raises(s.PayloadTooLarge, match="bytes"):
        s.decode_upload("image", b"\0" * (s.MAX_UPLOAD_BYTES + 1), "RGB")


def test_validate_edit_request():
    from PIL import Image

    from sd_py.serve import validate_edit_request

    image, mask = Image.new("RGB", (75, 61)), Image.new("L", (75, 61))
    r = validate_edit_request("a cat", image, seed="5", steps="3", strength="0.6")
    assert (r["width"], r["height"], r["seed"], r["steps"], r["strength"]) == (72, 56, 5, 3, 0.6)
    assert r["image"] is image and r["mask"] is None
    assert validate_edit_request("a cat", image)["strength"] == 0.8
    assert validate_edit_request("a cat", image, mask)["strength"] == 1.0


@pytest.mark.parametrize(
    "size, mask_size, fields, message",
    [
        ((75, 61), None, {"prompt": ""}, "prompt"),
        ((75, 61), None, {"strength": "0"}, "strength must be in (0, 1]"),
        ((75, 61), None, {"strength": "nan"}, "strength"),
        ((75, 61), None, {"strength": "x"}, "strength must be a number"),
        ((75, 61), None, {"steps": "0"}, "steps"),
        ((75, 61), (40, 40), {}, "the mask is 40x40 but the image is 75x61"),
        ((7, 64), None, {}, "between 8 and"),
        ((4000, 64), None, {}, "between 8 and"),
    ],
)
def test_validate_edit_request_rejects(size, mask_size, fields, message):
    from PIL import Image

    from sd_py.serve import validate_edit_request

    args = {"prompt": "a cat", **fields}
    mask = None if mask_size is None else Image.new("L", mask_size)
    with pytest.raises(BadRequest, match=re.escape(message)):
        validate_edit_request(image=Image.new("RGB", size), mask=mask, **args)
