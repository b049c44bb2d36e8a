"""sd_py.serve's answers to faults, without Ray running: the HTTP mapping of model errors, the
deadline and hang-ups at the ingress, and the model replica stopping a run whose requests are all
gone (with the real tiny pipeline). The same behaviours through a real Ray Serve:
test_serve_load.py."""

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError  # noqa: E402

import sd_py.serve as s  # noqa: E402
from conftest import replica_without_ray  # noqa: E402


@pytest.mark.parametrize(
    "error, status, kind",
    [
        (BackPressureError(num_queued_requests=16, max_queued_requests=16), 503, "overloaded"),
        (ActorDiedError(), 503, "replica_unavailable"),
        (ReplicaUnavailableError("r1"), 503, "replica_unavailable"),
        (ValueError("steps must be positive"), 422, "bad_request"),
        (FloatingPointError("non-finite values"), 500, "non_finite"),
        (RuntimeError("CUDA error"), 500, "error"),
    ],
)
def test_classify_failure(error, status, kind):
    assert s.classify_failure(error) == (status, kind)


class SlowResponse:
    """A Serve response that never comes, and records its cancellation."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


def _answer(remote, request=None):
    # `_answer_png` uses nothing of the ingress (an instance would need a Serve handle).
    return s.APIIngress.func_or_class._answer_png(None, remote, request or {"seed": 1})


def test_overload_and_lost_replica_are_503_with_retry_after():
    for error in (BackPressureError(num_queued_requests=2, max_queued_requests=2), ActorDiedError()):

        async def remote(request, error=error):
            raise error

        answer = asyncio.run(_answer(remote))
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == str(s.RETRY_AFTER_S)
        assert "try again" in json.loads(answer.body)["detail"]


def test_past_the_deadline_is_504_and_the_model_call_cancelled(monkeypatch):
    monkeypatch.setenv("SD_REQUEST_TIMEOUT_S", "1")
    response = SlowResponse()
    start = time.monotonic()
    answer = asyncio.run(_answer(lambda request: response))
    assert 1.0 <= time.monotonic() - start < 5
    assert answer.status_code == 504
    assert json.loads(answer.body) == {"detail": "no image within SD_REQUEST_TIMEOUT_S (1 s)"}
    assert response.cancelled


def test_a_client_hang_up_cancels_the_model_call():
    response = SlowResponse()

    async def hang_up():
        answering = asyncio.ensure_future(_answer(lambda request: response))
        await asyncio.sleep(0.1)
        answering.cancel()  # what Ray Serve does when the HTTP client disconnects
        with pytest.raises(asyncio.CancelledError):
            await answering

    asyncio.run(hang_up())
    assert response.cancelled


@pytest.fixture
def model(pipe):
    """A model replica's object around the session's tiny pipeline (no Ray)."""
    return replica_without_ray(pipe)


def _queued_requests(model, n, steps):
    """`n` requests as a replica holds them once queued."""
    model._queued += n
    return [{**s.validate_request(f"a cube {i}", 64, seed=i, steps=steps), "gone": threading.Event(), "queued": True} for i in range(n)]


def test_a_batch_whose_requests_are_all_gone_stops_at_the_next_step(model):
    batch = _queued_requests(model, 2, steps=s.MAX_STEPS)
    for r in batch:
        r["gone"].set()
    with pytest.raises(s.RequestGone, match="after step 1"):
        model._run(batch)
    assert model.stats["stopped_calls"] == 1 and model.stats["failures"] == 0
    assert model._problem() is None  # not a failure of the replica


def test_a_batch_runs_on_for_the_requests_still_waited_for(model):
    batch = _queued_requests(model, 2, steps=3)
    batch[0]["gone"].set()
    assert len(model._run(batch)) == 2  # the gone request's image is dropped by its caller
    assert model.stats["images"] == 2 and model.stats["stopped_calls"] == 0
    assert model._queued == 0 and model._running_images == 0


def test_a_cancelled_request_is_marked_gone_and_leaves_the_queue(model):
    seen = []

    async def run(request):
        seen.append(request)
        await asyncio.sleep(3600)

    async def cancel_it():
        serving = asyncio.ensure_future(model._serve_one(s.validate_request("a cat", 64), run))
        await asyncio.sleep(0.1)
        assert model._queued == 1
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

    asyncio.run(cancel_it())
    assert seen[0]["gone"].is_set()
    assert model._queued == 0


def test_a_failed_call_and_its_siblings_are_cancelled_without_raising_again():
    """A request for several images: when one model call fails, the others are cancelled, and a
    response whose cancel() raises its own error again (as Serve's does for a refused call) does
    not replace the answer (a BackPressureError escaping the route would be Ray's bare 503)."""

    class Refused:
        def __await__(self):
            raise BackPressureError(num_queued_requests=2, max_queued_requests=2)
            yield

        def cancel(self):
            raise BackPressureError(num_queued_requests=2, max_queued_requests=2)

    slow = SlowResponse()
    responses = iter([Refused(), slow])
    with pytest.raises(s.ModelError) as info:
        asyncio.run(s.model_pngs(lambda request: next(responses), [{"seed": 1}, {"seed": 2}]))
    assert (info.value.status_code, info.value.kind) == (503, "overloaded")
    assert slow.cancelled
