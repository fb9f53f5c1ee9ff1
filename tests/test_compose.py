"""Static checks of the container deployment (no Docker needed): docker-compose.yml,
deployments/Dockerfile, deployments/prefect.yaml and deployments/.env.example agree with each other
and with the pinned stack, and every prefect.yaml entrypoint loads as a Prefect flow."""
from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deployments" / "Dockerfile"
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
ENV_EXAMPLE = ROOT / "deployments" / ".env.example"

COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
PREFECT_YAML = yaml.safe_load(PREFECT_FILE.read_text())
DEPLOYMENTS: list[dict] = PREFECT_YAML["deployments"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR; never $$VAR (a literal $ for the container's shell)
_VAR_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
_REQUIRED_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):?\?")


def pin(name: str) -> str:
    """The version pyproject.toml pins for a direct dependency."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}==([^\s;]+)", dep.strip(), flags=re.IGNORECASE)
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def var_refs(value: object) -> set[str]:
    return {a or b for a, b in _VAR_REF.findall(str(value))}


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def option(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def profiles(service: dict) -> set[str]:
    return set(service.get("profiles") or [])


def depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else {d: (c or {}) for d, c in deps.items()}


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def image_tag(image: str) -> str | None:
    """The tag of `repo[:tag][@digest]`; None when untagged (a registry port is not a tag)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def pools_defined() -> dict[str, dict]:
    return {p["name"]: p for p in PREFECT_YAML["definitions"]["work_pools"].values()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = buf + stripped
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def client_services() -> dict[str, dict]:
    return {n: s for n, s in SERVICES.items() if "PREFECT_API_URL" in env(s)}


# --- docker-compose.yml ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SERVICES))
def test_image_is_pinned(name):
    svc = SERVICES[name]
    image = svc.get("image")
    assert image, f"{name}: no image (a built service must still name a tagged image)"
    tag = image_tag(image)
    if "@sha256:" not in image:
        assert tag and tag != "latest", f"{name}: {image!r} is not pinned to a version"
        assert re.search(r"\d+\.\d+", tag), f"{name}: tag {tag!r} names no version"
    if "build" in svc:
        build = svc["build"]
        assert Path(ROOT / build.get("context", "."), build["dockerfile"]).resolve() == DOCKERFILE
        assert image.split(":")[0] == "llm-refinery"
        assert tag.startswith(PYPROJECT["project"]["version"]), f"{name}: {image} is not the project version"


def test_prefect_server_image_is_the_pinned_prefect():
    assert SERVICES["prefect-server"]["image"] == f"prefecthq/prefect:{pin('prefect')}-python3.11"


def test_volumes_declared_and_used():
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                if vol.get("type", "volume") == "volume" and vol.get("source"):
                    used.add(vol["source"])
                continue
            source = vol.split(":", 1)[0]
            if ":" in vol and not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used - declared == set(), f"volumes used but not declared: {used - declared}"
    assert declared - used == set(), f"volumes declared but never used: {declared - used}"


def test_data_volume_shared_at_data():
    for name, svc in SERVICES.items():
        if name in ("postgres", "prefect-server"):
            continue
        assert "refinery-data:/data" in (svc.get("volumes") or []), f"{name} does not mount the data volume"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on(name):
    svc = SERVICES[name]
    for dep, cond in depends_on(svc).items():
        assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        if cond.get("condition") == "service_healthy":
            assert (SERVICES[dep].get("healthcheck") or {}).get("test"), f"{dep} has no healthcheck"
        # a service must not need one that its profiles never start
        assert profiles(SERVICES[dep]) <= profiles(svc) or not profiles(SERVICES[dep]), (name, dep)


def test_postgres_private_and_healthy():
    pg = SERVICES["postgres"]
    assert not pg.get("ports"), "postgres must not be published on the host"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "/var/lib/postgresql/data" in " ".join(pg["volumes"])


def test_server_database_url_points_at_postgres():
    server = env(SERVICES["prefect-server"])
    url = server.get("PREFECT_API_DATABASE_CONNECTION_URL") or server["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://")
    # the ${...} references contain ':' and '?': replace them before parsing the URL
    parsed = urlsplit(re.sub(r"\$\{[^}]*\}", "X", url))
    assert parsed.hostname == "postgres" and "postgres" in SERVICES
    assert parsed.port == 5432
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= var_refs(url)
    assert url.index("POSTGRES_DB") > url.index("@postgres:5432/")
    assert depends_on(SERVICES["prefect-server"])["postgres"]["condition"] == "service_healthy"


def test_server_command_ports_and_analytics():
    server = SERVICES["prefect-server"]
    cmd = command(server)
    assert cmd[:3] == ["prefect", "server", "start"] and option(cmd, "--host") == "0.0.0.0"
    assert any(str(p).endswith("4200:4200") for p in server["ports"])
    assert env(server)["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "4200/api/health" in " ".join(server["healthcheck"]["test"])


def test_auth_string_on_server_and_every_client():
    server_refs = var_refs(env(SERVICES["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"])
    assert len(server_refs) == 1, "PREFECT_SERVER_API_AUTH_STRING must come from one env-file variable"
    clients = client_services()
    assert {"serve", "worker", "trainer", "dask-worker"} <= set(clients)
    for name, svc in clients.items():
        e = env(svc)
        assert e["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert var_refs(e.get("PREFECT_API_AUTH_STRING", "")) == server_refs, f"{name}: wrong or missing auth"
        assert depends_on(svc)["prefect-server"]["condition"] == "service_healthy", name
        # the result cache lives on the shared volume, so every container finds the same cached shards
        assert e.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "").startswith("/data/"), name
    (var,) = server_refs
    assert re.fullmatch(r"[^:\s]+:\S+", env_example()[var]), f"{var} must be in user:password form"


def test_env_files_exist_and_cover_required_variables():
    files = []
    for svc in SERVICES.values():
        ef = svc.get("env_file") or []
        for item in [ef] if isinstance(ef, (str, dict)) else ef:
            files.append(item["path"] if isinstance(item, dict) else item)
    assert files, "secrets should come from an env file"
    for f in files:
        p = ROOT / f
        assert p.exists() or p.with_name(p.name + ".example").exists(), f"{f} (or {f}.example) missing"
    example = env_example()
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PREFECT_AUTH_STRING"} <= set(example)
    required = set(_REQUIRED_REF.findall(COMPOSE_FILE.read_text()))
    assert required <= set(example), f"required but not in .env.example: {required - set(example)}"


def test_default_profile_is_the_server_and_serve():
    default = {n for n, s in SERVICES.items() if not profiles(s)}
    assert default == {"postgres", "prefect-server", "serve"}
    assert command(SERVICES["serve"]) == ["python", "deployments/serve.py"]


def test_gpu_profile_reserves_nvidia_devices_and_serves_the_training_pool():
    gpu = {n: s for n, s in SERVICES.items() if "gpu" in profiles(s)}
    trainers = []
    for name, svc in gpu.items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        if any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
            trainers.append(name)
    assert trainers, "the gpu profile has no service with an nvidia device reservation"
    pools = {option(command(SERVICES[t]), "--pool") for t in trainers}
    for dep in DEPLOYMENTS:
        if dep["entrypoint"].startswith("flows/train.py:"):
            assert dep["work_pool"]["name"] in pools, f"{dep['name']} is not on a GPU worker's pool"
            assert dep.get("concurrency_limit") == 1, f"{dep['name']}: two runs could share a GPU"
    for t in trainers:
        assert option(command(SERVICES[t]), "--limit") == "1"
        assert SERVICES[t]["build"].get("args", {}).get("TORCH_INDEX"), "the GPU image needs a CUDA torch index"


def test_dask_profile_scheduler_and_workers_agree():
    dask = {n: s for n, s in SERVICES.items() if "dask" in profiles(s)}
    schedulers = {n: s for n, s in dask.items() if command(s)[:2] in (["dask", "scheduler"], ["dask-scheduler"])}
    workers = {n: s for n, s in dask.items() if command(s)[:2] in (["dask", "worker"], ["dask-worker"])}
    assert len(schedulers) == 1 and workers
    (sched_name, sched), = schedulers.items()
    assert not sched.get("ports"), "the scheduler and dashboard are internal only"
    address = f"tcp://{sched_name}:{option(command(sched), '--port') or 8786}"
    for name, w in workers.items():
        cmd = command(w)
        assert address in cmd, f"{name} does not connect to {address}"
        assert option(cmd, "--nworkers") and option(cmd, "--nthreads"), name
        assert depends_on(w)[sched_name]["condition"] == "service_healthy"
    for name, svc in client_services().items():
        if "REFINERY_DASK_ADDRESS" in env(svc):
            assert env(svc)["REFINERY_DASK_ADDRESS"] == address, name


def test_worker_pools_are_defined_in_prefect_yaml():
    defined = pools_defined()
    for name, svc in SERVICES.items():
        cmd = command(svc)
        if cmd[:3] == ["prefect", "worker", "start"]:
            assert option(cmd, "--pool") in defined, f"{name} serves a pool prefect.yaml does not define"


# --- deployments/Dockerfile -----------------------------------------------------------------------

def test_dockerfile_base_image_pinned():
    froms = [args.split()[-1] if " AS " not in args.upper() else args.split()[0]
             for word, args in dockerfile_instructions() if word == "FROM"]
    assert froms
    for image in froms:
        tag = image_tag(image)
        assert tag and tag != "latest", image
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: pin the patch version"


def test_dockerfile_installs_torch_first_then_project_with_constraints():
    steps = dockerfile_instructions()
    runs = [(i, args) for i, (word, args) in enumerate(steps) if word == "RUN"]
    torch = [i for i, args in runs if f"torch=={pin('torch')}" in args and "pip install" in args]
    project = [i for i, args in runs if re.search(r"pip install .*-c constraints\.txt .*(-e )?[\"']?\.(\[|[\"'\s]|$)", args)]
    assert torch, f"no RUN installs torch=={pin('torch')}"
    assert project, "no RUN installs the project with -c constraints.txt"
    assert torch[0] < project[0], "torch must be installed before the project"
    assert any("pip==26.3" in args for _, args in runs)
    copies = [args for word, args in steps if word == "COPY"]
    copied = " ".join(copies).split()
    assert "constraints.txt" in copied and "pyproject.toml" in copied
    assert "README.md" in copied, "pyproject's readme must be in the image for the install"
    copy_before_project = [i for i, (w, a) in enumerate(steps) if w == "COPY" and "constraints.txt" in a]
    assert copy_before_project and copy_before_project[0] < project[0]
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert f"{pkg}/" in copied, f"package {pkg} is not copied into the image"


def test_dockerfile_runtime_settings():
    steps = dockerfile_instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert [args for word, args in steps if word == "WORKDIR"][-1] == "/app"
    envs = " ".join(args for word, args in steps if word == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in envs
    assert any(word == "ARG" and args.startswith("TORCH_INDEX=") for word, args in steps)
    for word, args in steps:
        if word in ("COPY", "ADD"):
            sources = args.split()[:-1]
            assert ".env" not in " ".join(sources), "secrets must not be copied into the image"
            assert not any(s.rstrip("/") in (".", "deployments") for s in sources), (
                "copy deployments/ file by file: deployments/.env holds the secrets")


# --- deployments/prefect.yaml ---------------------------------------------------------------------

def test_prefect_yaml_validates_with_prefect():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(PREFECT_YAML)
    assert model.name == "llm-refinery"
    assert model.prefect_version == pin("prefect")
    assert len(model.deployments) == len(DEPLOYMENTS)
    workdir = [args for word, args in dockerfile_instructions() if word == "WORKDIR"][-1]
    assert PREFECT_YAML["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]


def test_deployments_are_unique_and_enforce_their_schema():
    names = [d["name"] for d in DEPLOYMENTS]
    assert len(names) == len(set(names))
    assert {"crawl", "curate", "shard", "train", "finetune", "data-to-model"} <= set(names)
    for dep in DEPLOYMENTS:
        assert dep.get("enforce_parameter_schema") is True, dep["name"]


def test_deployment_work_pools_are_defined():
    defined = pools_defined()
    assert {"process-pool", "docker-pool", "k8s-gpu-pool"} <= set(defined)
    for dep in DEPLOYMENTS:
        assert dep["work_pool"]["name"] in defined, f"{dep['name']}: undefined work pool"


def test_container_pools_match_compose():
    pools = pools_defined()
    docker = pools["docker-pool"]["job_variables"]
    built = {s["image"] for s in SERVICES.values() if "build" in s}
    assert docker["image"] in built
    data_volume = COMPOSE["volumes"]["refinery-data"]["name"]
    assert f"{data_volume}:/data" in docker["volumes"]
    assert COMPOSE["networks"]["default"]["name"] in docker["networks"]
    k8s = pools["k8s-gpu-pool"]["job_variables"]
    assert image_tag(k8s["image"]) in {image_tag(i) for i in built}
    assert k8s["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_crawl_has_a_valid_cron_schedule():
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    (crawl,) = [d for d in DEPLOYMENTS if d["entrypoint"] == "flows/crawl.py:crawl_flow"]
    crons = [s for s in crawl.get("schedules") or [crawl.get("schedule")] if s and s.get("cron")]
    assert crons, "the crawl deployment has no cron schedule"
    for s in crons:
        RawScheduleConfig.model_validate(s)
        CronSchedule(cron=s["cron"], timezone=s.get("timezone"))
    assert all(str(v).startswith("/data/") for v in crawl["parameters"].values())


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_is_a_flow_taking_the_parameters(dep, monkeypatch):
    """Loads each entrypoint the way `prefect deploy` does and checks the deployment's parameters
    against the flow's signature and parameter schema (enforced at run creation)."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    path, func = dep["entrypoint"].split(":")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(dep["entrypoint"], use_placeholder_flow=False)
    assert isinstance(flow, Flow), f"{dep['entrypoint']} is not a Prefect flow"
    params = dep.get("parameters") or {}
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(params) <= accepted, f"unknown parameters {set(params) - accepted}"
    schema = parameter_schema(flow).model_dump_for_openapi()
    errors = validate(params, schema, raise_on_error=False, ignore_required=True)
    assert not errors, [e.message for e in errors]
