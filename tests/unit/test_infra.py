"""infra/ and docs/runbook.md kept honest: the launcher YAML against Ray's own schema and config checks,
the KubeRay RayJob against the fields KubeRay needs, and every `relay` / `ray` / `python jobs/...`
command the runbook and manifests show against the real CLI's arguments (each `--help`, in process)."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import io
import json
import re
import runpy
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "infra/aws/cluster.yaml"
RAYJOB = REPO / "infra/k8s/rayjob.yaml"
OPERATOR_VALUES = REPO / "infra/k8s/kuberay-operator-values.yaml"
# KubeRay 1.7.0's RayJob v1 schema, vendored (tests/support/kuberay/README.md says from where and how).
RAYJOB_SCHEMA = REPO / "tests/support/kuberay/rayjob-v1-openapi-v1.7.0.json"
# A head replacement: a new on-demand node, the image pull, Ray's start-up. The run must outlive it.
HEAD_OUTAGE_SECONDS = 20 * 60
# Managed node groups label capacity one way, Karpenter and EKS Auto Mode another.
CAPACITY_LABELS = {"eks.amazonaws.com/capacityType": "SPOT", "karpenter.sh/capacity-type": "spot"}
RUNBOOK = REPO / "docs/runbook.md"
SECRET_ENV = {
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
}
# Shapes of real secrets that must never be written into infra/ or docs/.
SECRET_PATTERNS = [
    r"hf_[A-Za-z0-9]{30,}",
    r"AKIA[0-9A-Z]{16}",
    r"discord(app)?\.com/api/webhooks/\d+",
    r"hooks\.slack\.com/services/T",
]


def aws_config() -> dict:
    return yaml.safe_load(AWS.read_text())


def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert len(docs) == 1, "rayjob.yaml holds exactly the RayJob"
    return docs[0]


def seed_cluster() -> dict:
    return json.loads((REPO / "configs/sd3/cluster.json").read_text())


# ----------------------------------------------------------------------------- AWS launcher YAML


def test_cluster_yaml_validates_against_rays_autoscaler_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws_config(), schema)


def test_cluster_yaml_passes_rays_own_config_checks():
    """What `ray up` does before touching AWS: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws_config())
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_cluster_yaml_head_on_demand_workers_on_spot():
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on demand: its loss ends the job"
    assert head["resources"].get("CPU") == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for name, node_type in workers.items():
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type["resources"]["GPU"] == 1, name
        assert node_type.get("min_workers", 0) <= node_type["max_workers"], name
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: S3 access comes from the instance role"


# The GPU each instance family carries: a data-parallel group must not mix two of them.
GPU_OF_FAMILY = {"g6e": "L40S", "p5": "H100", "p5e": "H200", "g5": "A10G", "g6": "L4", "p4d": "A100", "m7i": None}


def _train_resource(node_type: dict) -> str | None:
    names = [r for r in node_type["resources"] if r.startswith("train_gpu")]
    assert len(names) <= 1, f"one training resource per node type, not {names}"
    return names[0] if names else None


def test_training_and_validation_gpus_never_mix():
    config, cluster = aws_config(), seed_cluster()
    types = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    train = {n: t for n, t in types.items() if _train_resource(t)}
    validation = {n: t for n, t in types.items() if "validation_gpu" in t["resources"]}
    assert validation and not set(train) & set(validation)
    for name, node_type in train.items():
        assert node_type["resources"]["CPU"] >= cluster["cpus_per_worker"], f"{name} cannot host a training worker"
    for name, node_type in validation.items():
        # too few CPUs for a training worker, so only validation actors (validation_gpu: 1) land there
        assert node_type["resources"]["CPU"] < cluster["cpus_per_worker"], name
    assert config["max_workers"] >= cluster["num_workers"] + 1


def test_a_data_parallel_group_never_mixes_gpu_generations():
    """Training workers ask for one train_gpu* resource; every node type that advertises it must carry the
    same GPU, or DDP runs the whole group at the slowest card's pace."""
    config, cluster = aws_config(), seed_cluster()
    groups: dict[str, dict[str, str]] = {}
    for name, node_type in config["available_node_types"].items():
        resource = _train_resource(node_type)
        if resource:
            family = node_type["node_config"]["InstanceType"].split(".")[0]
            assert family in GPU_OF_FAMILY, f"{name}: add {family} to GPU_OF_FAMILY"
            groups.setdefault(resource, {})[name] = GPU_OF_FAMILY[family]
    for resource, gpus in groups.items():
        assert len(set(gpus.values())) == 1, f"{resource} is offered by {gpus}: one GPU generation per group"
    wanted = [r for r in cluster["resources_per_worker"] if r.startswith("train_gpu")]
    assert wanted and wanted[0] in groups, f"cluster.json asks for {wanted}; the launcher offers {sorted(groups)}"
    offered = [t for t in config["available_node_types"].values() if _train_resource(t) == wanted[0]]
    assert sum(t["max_workers"] for t in offered) >= cluster["num_workers"]
    assert len({t["node_config"]["InstanceType"] for t in offered}) >= 2, "a second spot pool for the same GPU"


# ----------------------------------------------------------------------------- what the head must run


def _module_file(module: str) -> Path | None:
    import ray

    base = Path(ray.__file__).parent.parent / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def aws_provider_imports() -> set[str]:
    """Top-level third-party modules the installed Ray's AWS node provider imports (read with ast, following
    its own ray.autoscaler._private.aws modules), so this test moves when Ray changes what it needs."""
    todo, seen, external = ["ray.autoscaler._private.aws.node_provider"], set(), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith("ray.autoscaler._private.aws"):
                    todo.append(name)
                elif top != "ray" and top not in sys.stdlib_module_names:
                    external.add(top)
    return external


def _pip_requirements(commands: list[str]) -> list[str]:
    """The requirements `pip install` / `uv pip install` lines name; `-e .` stands for this project."""
    from packaging.requirements import Requirement

    valued = {"--python", "--index-url", "--extra-index-url", "-i", "-c", "-r", "--find-links", "-f"}
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts: list[list[str]] = [[]]
        for token in lexer:  # `a && b; c | d`: one argv each, quotes respected
            parts.append([]) if set(token) <= set("&;|()<>") else parts[-1].append(token)
        for argv in parts:
            if "install" not in argv or "pip" not in argv[: argv.index("install")]:
                continue
            args, skip = argv[argv.index("install") + 1 :], False
            for arg in args:
                if skip:
                    skip = False
                elif arg in valued:
                    skip = True
                elif arg.startswith("."):  # the project, with its extras
                    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                    extras = Requirement("p" + arg[1:]).extras if "[" in arg else set()
                    found += project["dependencies"]
                    found += [r for e in extras for r in project["optional-dependencies"][e]]
                elif not arg.startswith("-"):
                    found.append(arg)
    return found


def installed_closure(requirements: list[str]) -> set[str]:
    """Distributions those requirements install: them and, from the installed metadata, their dependencies."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = Requirement(line)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return {name for name, _ in seen}


def test_head_setup_provides_every_module_the_aws_node_provider_imports():
    """`ray up` merges cluster.yaml over Ray's aws/defaults.yaml (a list given here replaces the default's),
    then runs setup_commands + head_setup_commands on the head, whose autoscaler imports the AWS provider."""
    from packaging.utils import canonicalize_name
    from ray.autoscaler._private.util import prepare_config

    needed = aws_provider_imports()
    assert {"boto3", "botocore"} <= needed, needed  # what Ray 2.60 imports; a change shows up here
    prepared = prepare_config(aws_config())
    installed = installed_closure(_pip_requirements(prepared["head_setup_commands"]))
    dists = importlib.metadata.packages_distributions()
    missing = {m: dists.get(m) for m in needed if not {canonicalize_name(d) for d in dists.get(m, [m])} & installed}
    assert not missing, f"the head's setup installs nothing that provides {missing}: its autoscaler cannot start"


def test_setup_installs_cuda_torch_on_workers_and_starts_the_spot_agent():
    config = aws_config()
    workers = " ".join(config["worker_setup_commands"])
    assert "torch==2.13.0" in workers and "download.pytorch.org/whl/cu128" in workers and "-e ." in workers
    start = config["worker_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(start) if "ray start --address" in c)
    agent = next(i for i, c in enumerate(start) if "relay spot-agent" in c)
    assert agent > ray_start, "the agent needs the local Ray node it drains"
    assert "ray start --head" in " ".join(config["head_start_ray_commands"])


def _runbook_figures() -> dict:
    return runpy.run_path(str(REPO / "scripts/runbook_figures.py"))


def test_runbook_figures_are_current():
    """docs/runbook.md's measured-figures section is what scripts/runbook_figures.py makes of bench/ today."""
    figures = _runbook_figures()
    assert figures["section"](RUNBOOK.read_text()) == figures["render"](), "run: python scripts/runbook_figures.py"


def test_cluster_json_prices_match_the_runbook_and_leave_the_validation_node_out():
    """relay status multiplies these by the hours: the validation node scales to zero between rounds, so an
    always-on price for it would overstate the cost by its whole hourly price."""
    figures, cluster = _runbook_figures(), seed_cluster()
    prices = figures["PRICES"]
    disks = figures["DISK_GB"] * figures["DISK_PER_GB_MONTH"] / 730
    assert cluster["hourly_price_worker"] == prices["g6e.2xlarge"][0]
    assert cluster["hourly_price_head"] == pytest.approx(prices["m7i.xlarge"][0] + disks, abs=0.01)


def test_docs_make_no_stale_claims():
    stale = ["not measured yet", "Not p4d/p5", "8 GPUs per node", "T ≈ 2.3", "g5.2xlarge", "g6.2xlarge"]
    for path in (RUNBOOK, AWS, REPO / "infra/aws/README.md", RAYJOB, REPO / "infra/k8s/README.md"):
        text = path.read_text()
        found = [s for s in stale if s in text]
        assert not found, f"{path.relative_to(REPO)} still says {found}"


def test_infra_and_docs_hold_no_secrets():
    for path in [*sorted((REPO / "infra").rglob("*")), RUNBOOK]:
        if path.is_file():
            text = path.read_text()
            for pattern in SECRET_PATTERNS:
                assert not re.search(pattern, text), f"{path.relative_to(REPO)} matches {pattern}"


# ----------------------------------------------------------------------------- KubeRay RayJob


def _groups(job: dict) -> list[dict]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def _custom_resources(start_params: dict) -> dict:
    """KubeRay passes rayStartParams.resources through to `ray start --resources`, quoted: '"{...}"'."""
    raw = start_params.get("resources")
    return json.loads(raw.strip().strip('"').replace('\\"', '"')) if raw else {}


def _strict(schema):
    """The CRD's schema as the API server applies it with strict field validation: an object's unknown
    fields are errors unless it preserves them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
        return schema
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


def test_rayjob_validates_strictly_against_the_vendored_kuberay_crd():
    schema = _strict(json.loads(RAYJOB_SCHEMA.read_text()))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(rayjob()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors)
    groups = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["workerGroupSpecs"]["items"]
    assert groups["properties"]["priority"]["type"] == "integer", "WorkerGroupSpec.priority (KubeRay 1.7)"


def test_rayjob_has_the_fields_kuberay_requires():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] > 0, "job-level retry on a new cluster"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in _groups(job):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
        assert str(ray_container["resources"]["limits"]["nvidia.com/gpu"]) == "1", group["groupName"]


def _capacity_terms(pod: dict) -> list[dict]:
    affinity = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [{e["key"]: e["values"] for e in term["matchExpressions"]} for term in affinity["nodeSelectorTerms"]]


def test_rayjob_nodes_match_under_managed_node_groups_karpenter_and_auto_mode():
    """Required terms are ORed: one per labelling scheme, each with the same instance types."""
    job = rayjob()
    head = _capacity_terms(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])
    assert {k: v for term in head for k, v in term.items()} == {
        "eks.amazonaws.com/capacityType": ["ON_DEMAND"],
        "karpenter.sh/capacity-type": ["on-demand"],
    }
    for group in _groups(job):
        pod = group["template"]["spec"]
        assert "nodeSelector" not in pod, "a nodeSelector is ANDed: it would match one scheme only"
        terms = _capacity_terms(pod)
        for label, value in CAPACITY_LABELS.items():
            term = next((t for t in terms if label in t), None)
            assert term and term[label] == [value], f"{group['groupName']}: no term for {label}"
        assert len({tuple(t["node.kubernetes.io/instance-type"]) for t in terms}) == 1, group["groupName"]
        assert "preferredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["nodeAffinity"], (
            "the autoscalers ignore scheduling preferences: order groups by priority"
        )


def test_rayjob_training_groups_are_per_instance_type_with_priorities_rays_autoscaler_reads():
    """Fed to the installed Ray's own KubeRay config translation: every training group is one instance type of
    one GPU, advertises train_gpu and has a distinct priority; the first has the highest."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = rayjob()
    cluster_cr = {"metadata": {"name": "c", "namespace": "default"}, "spec": job["spec"]["rayClusterSpec"]}
    node_types = _derive_autoscaling_config_from_ray_cr(cluster_cr)["available_node_types"]
    train = {g["groupName"]: g for g in _groups(job) if "train_gpu" in _custom_resources(g["rayStartParams"])}
    assert len(train) >= 2, "a second spot pool for the training GPU"
    for name, group in train.items():
        types = _capacity_terms(group["template"]["spec"])[0]["node.kubernetes.io/instance-type"]
        assert len(types) == 1 and GPU_OF_FAMILY[types[0].split(".")[0]] == "L40S", name
        assert node_types[name]["resources"]["train_gpu"] == 1 and node_types[name]["priority"] == group["priority"]
    priorities = [g["priority"] for g in train.values()]
    assert priorities == sorted(set(priorities), reverse=True), priorities
    assert job["spec"]["rayClusterSpec"]["autoscalerOptions"]["version"] == "v2", "priority needs autoscaler v2"
    assert sum(g["maxReplicas"] for g in train.values()) >= seed_cluster()["num_workers"]


def _quantity_gib(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Mi|G|M)?", str(value)).groups()
    return float(number) * {"Gi": 1, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30, None: 1 / 2**30}[unit]


def test_rayjob_gpu_pods_request_the_disk_the_model_cache_needs():
    """HF_HOME (the image's /var/cache/huggingface) holds the 16-20 GB SD3.5 Medium repo: it must be a volume
    the pod's ephemeral-storage request covers, or the kubelet evicts the pod mid-download."""
    hf_home = re.search(r"HF_HOME=(\S+)", (REPO / "infra/k8s/Dockerfile").read_text()).group(1)
    for group in _groups(rayjob()):
        pod = group["template"]["spec"]
        ray_container = pod["containers"][0]
        mount = next(m for m in ray_container["volumeMounts"] if m["mountPath"] == hf_home)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        cache = _quantity_gib(volume["emptyDir"]["sizeLimit"])
        assert cache >= 25, f"{group['groupName']}: {cache} GiB for a 16-20 GB model"
        assert _quantity_gib(ray_container["resources"]["requests"]["ephemeral-storage"]) >= cache, group["groupName"]


def test_every_way_a_gpu_pod_is_taken_drains_its_ray_node_first():
    """An eviction sends SIGTERM: the Ray container's preStop drains the node (the container's SIGTERM waits
    for it) and the agent drains on its own SIGTERM, both with a deadline inside the pod's grace."""
    for group in _groups(rayjob()):
        pod = group["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        containers = {c["name"]: c for c in pod["containers"]}
        if "train_gpu" in _custom_resources(group["rayStartParams"]):
            hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
            assert hook[:3] == ["relay", "spot-agent", "--drain-now"], hook
            assert 0 < float(hook[hook.index("--sigterm-grace") + 1]) < grace
        agent = shlex.split(containers["spot-agent"]["args"][0].split("exec", 1)[1])
        assert 0 < float(agent[agent.index("--sigterm-grace") + 1]) < grace, group["groupName"]


def _k8s_job_backoff_seconds(retries: int) -> float:
    """How long a Kubernetes Job keeps retrying failed pods: 10 s, doubling, at most 6 minutes apart."""
    return sum(min(10 * 2**n, 360) for n in range(retries))


def test_a_head_outage_longer_than_kuberays_status_check_timeout_does_not_end_the_run():
    """KubeRay 1.7 fails a RayJob whose dashboard is unreachable for RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS (300 s
    unless the operator's environment says otherwise) with JobStatusCheckTimeoutExceeded, never retried.
    The operator values must lift it above a head replacement, and the submitter must keep retrying
    (resubmitting to the recreated head) for at least as long."""
    env = {e["name"]: e["value"] for e in yaml.safe_load(OPERATOR_VALUES.read_text())["env"]}
    timeout = int(env.get("RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS", 300))
    assert timeout > HEAD_OUTAGE_SECONDS, f"status-check timeout {timeout} s < a {HEAD_OUTAGE_SECONDS} s head outage"
    window = _k8s_job_backoff_seconds(rayjob()["spec"]["submitterConfig"]["backoffLimit"])
    assert HEAD_OUTAGE_SECONDS <= window < timeout, f"the submitter retries for {window} s"
    for doc in (RAYJOB, REPO / "infra/k8s/README.md"):
        text = doc.read_text()
        assert "RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS" in text and "kuberay-operator-values.yaml" in text, doc.name
        assert "recreates the head pod" in text, f"{doc.name} must say what KubeRay does with a lost head"


def test_rayjob_places_head_on_demand_and_gpus_on_spot_with_the_agent_beside_them():
    job = rayjob()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in _groups(job):
        pod = group["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        agent = next(c for c in pod["containers"] if c["name"] == "spot-agent")
        shared = {m["name"] for m in agent["volumeMounts"]} & {m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert shared, "the agent finds its Ray node through the Ray container's /tmp/ray"
    resources = {g["groupName"]: _custom_resources(g["rayStartParams"]) for g in _groups(job)}
    assert [g for g, r in resources.items() if r.get("train_gpu") == 1]
    assert [g for g, r in resources.items() if r.get("validation_gpu") == 1]
    assert not [g for g, r in resources.items() if "train_gpu" in r and "validation_gpu" in r]
    for group in (g for g in _groups(job) if "train_gpu" in resources[g["groupName"]]):
        assert float(group["rayStartParams"]["num-cpus"]) >= seed_cluster()["cpus_per_worker"]


def test_rayjob_takes_secrets_only_from_secret_references():
    job = rayjob()
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in _groups(job))]
    for pod in pods:
        for container in pod["containers"]:
            for env in container.get("env", []):
                if env["name"] in SECRET_ENV:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]
        ray_env = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert "HF_TOKEN" in ray_env
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in secret_volumes}
        assert "/etc/terminus-relay" in mounts, "the webhook config comes from a Secret file"
    assert "/etc/terminus-relay/webhook.json" in job["spec"]["entrypoint"]


# ----------------------------------------------------------------------------- commands vs the CLIs


@dataclass
class Command:
    program: str  # "relay", "ray" or "python jobs/x.py"
    sub: tuple[str, ...]
    flags: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return " ".join([self.program, *self.sub])


def _fenced_commands(markdown: str) -> list[str]:
    lines = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                lines.append(line.strip())
    return lines


def _split(argv: list[str]) -> list[list[str]]:
    """`ray job submit ... -- python jobs/train.py ...` is two commands; `cmd; cmd` and `a && b` too."""
    parts, current = [], []
    for token in argv:
        if token in ("--", "&&", ";", "||"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [*parts, current]


def parse_command(argv: list[str], source: str) -> Command | None:
    if not argv:
        return None
    head = Path(argv[0]).name
    if head in ("python", "python3") and len(argv) > 1 and argv[1].startswith("jobs/"):
        program, rest, depth = f"python {argv[1]}", argv[2:], 0
    elif head in ("relay", "ray"):
        program, rest = head, argv[1:]
        depth = 2 if head == "ray" and rest[:1] == ["job"] else 1
    else:
        return None
    sub = tuple(rest[:depth])
    flags = {t.split("=", 1)[0] for t in rest[depth:] if re.fullmatch(r"--[a-z][\w-]*(=.*)?|-[a-zA-Z]", t)}
    paths = {t for t in rest if re.fullmatch(r"(configs|infra|jobs)/[\w./-]+\.(json|yaml|py)", t)}
    return Command(program, sub, flags, paths, {source})


def collect_commands() -> dict[str, Command]:
    found: dict[str, Command] = {}

    def add(argv: list[str], source: str) -> None:
        for part in _split(argv):
            command = parse_command(part, source)
            if command:
                known = found.setdefault(command.name, Command(command.program, command.sub))
                known.flags |= command.flags
                known.paths |= command.paths
                known.sources |= command.sources

    for line in _fenced_commands(RUNBOOK.read_text()):
        add(shlex.split(line), "docs/runbook.md")
    for line in aws_config()["worker_start_ray_commands"]:
        argv = shlex.split(line)
        # `sudo systemd-run ... /home/ubuntu/relay-venv/bin/relay spot-agent ...`: the command starts at relay
        starts = [i for i, token in enumerate(argv) if Path(token).name == "relay"]
        add(argv[starts[0] :] if starts else argv, "infra/aws/cluster.yaml")
    job = rayjob()
    add(shlex.split(job["spec"]["entrypoint"]), "infra/k8s/rayjob.yaml")
    for group in _groups(job):
        for container in group["template"]["spec"]["containers"]:
            for arg in container.get("args", []):
                add(shlex.split(arg.split("exec", 1)[-1]), "infra/k8s/rayjob.yaml")
            hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if hook:
                add(hook, "infra/k8s/rayjob.yaml preStop")
    return found


COMMANDS = collect_commands()


def cli_help(command: Command) -> str:
    """The command's --help text, run in this process; pytest.skip when the command is not built yet."""
    out, err = io.StringIO(), io.StringIO()
    if command.program == "ray":
        from click.testing import CliRunner
        from ray.scripts.scripts import cli

        result = CliRunner().invoke(cli, [*command.sub, "--help"])
        assert result.exit_code == 0, f"`{command.name} --help` failed: {result.output[-500:]}"
        return result.output
    if command.program == "relay":
        from orchestrator.cli import main

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            main([*command.sub, "--help"])
        if exit_.value.code != 0 and "invalid choice" in err.getvalue():
            pytest.skip(
                f"`{command.name}` is not in the relay CLI yet (being written by the lead); "
                f"used in {', '.join(sorted(command.sources))}"
            )
        assert exit_.value.code == 0, err.getvalue()
        return out.getvalue()
    script = REPO / command.program.split()[1]
    if not script.is_file():
        pytest.skip(f"`{command.program}` does not exist yet; used in {', '.join(sorted(command.sources))}")
    argv = sys.argv
    sys.argv = [str(script), "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_.value.code == 0, err.getvalue()
    return out.getvalue()


def test_commands_were_found():
    names = set(COMMANDS)
    assert {"relay status", "relay supervise", "relay spot-agent", "python jobs/train.py", "ray job submit", "ray up"} <= names, (
        names
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_documented_command_and_flags_exist(name):
    command = COMMANDS[name]
    for path in command.paths:
        assert (REPO / path).exists(), f"{name}: {path} does not exist ({', '.join(sorted(command.sources))})"
    text = cli_help(command)
    missing = sorted(f for f in command.flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
    assert not missing, f"`{name}` has no {missing} (used in {', '.join(sorted(command.sources))})"
