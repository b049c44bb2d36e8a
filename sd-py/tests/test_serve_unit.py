"""sd_py.serve without Ray running: request validation and batch grouping."""

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
