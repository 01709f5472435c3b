"""deploy/: the Kubernetes manifests and the systemd unit say only what the app really does. The
YAML loads, the pieces name each other, the ConfigMap's TOML is valid settings, the probes answer 200
on the port they name, every FLAGPROXY_* variable is one the settings loader reads, and systemd
accepts the unit."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import LOCALHOST, PYTHON, REPO, RedisServer, clean_env, free_port, unique_namespace, wait_for

from proxy.cli import build_parser
from proxy.config import ENV_PREFIX, Settings, all_sections, load_settings, setting_names

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "flagproxy.service"


def manifests() -> dict[str, dict[str, Any]]:
    """kind → the one manifest of that kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["kind"] not in found, f"a second {doc['kind']} in {path}"
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(only)


def config_path() -> str:
    args = container()["args"]
    return str(args[args.index("--config") + 1])


def secret_env() -> dict[str, str]:
    return {key: str(value) for key, value in manifests()["Secret"]["stringData"].items()}


def settings(tmp_path: Path) -> Settings:
    """The ConfigMap's TOML through the project's own loader, with the Secret as the environment."""
    toml = tmp_path / "flagproxy.toml"
    toml.write_text(manifests()["ConfigMap"]["data"][Path(config_path()).name])
    return load_settings(toml, env=secret_env())


def test_every_yaml_file_loads() -> None:
    files = [*DEPLOY.rglob("*.yaml"), REPO / "docker-compose.yml"]
    assert len(files) >= 5
    for path in files:
        assert all(doc for doc in yaml.safe_load_all(path.read_text())), path
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= manifests().keys()


def test_manifests_name_each_other() -> None:
    found = manifests()
    pod = found["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    ports = {port["name"] for port in container()["ports"]}
    assert {port["targetPort"] for port in found["Service"]["spec"]["ports"]} <= ports
    assert container()["envFrom"] == [{"secretRef": {"name": found["Secret"]["metadata"]["name"]}}]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    (mount,) = [m for m in container()["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    assert str(Path(mount["mountPath"]) / Path(config_path()).name) == config_path()
    assert Path(config_path()).name in found["ConfigMap"]["data"]


def test_configmap_is_valid_settings_on_the_container_ports(tmp_path: Path) -> None:
    loaded = settings(tmp_path)
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports["http"] == loaded.server.port
    assert ports["control"] == (loaded.server.control_port or loaded.server.port)
    assert loaded.server.host == "0.0.0.0", "a pod is reached on its own address, not loopback"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["port"] == "control", probe
    assert loaded.store.redis_url, "replicas > 1 share a Redis"


def env_names_read_by_the_loader() -> set[str]:
    """FLAGPROXY_<SECTION>_<KEY> of every setting (nested ones too), and FLAGPROXY_ORIGINS."""
    names = {f"{ENV_PREFIX}ORIGINS"}
    for section, kind in all_sections().items():
        names |= {f"{ENV_PREFIX}{section}_{key}".upper().replace(".", "_") for key in setting_names(kind)}
    return names


def test_environment_variables_are_ones_the_loader_reads() -> None:
    files = [*DEPLOY.rglob("*"), REPO / "Dockerfile", REPO / "docker-compose.yml"]
    named = {
        (name, path.name)
        for path in files
        if path.is_file()
        for name in re.findall(r"\bFLAGPROXY_[A-Z0-9_]*[A-Z0-9]", path.read_text())
    }
    assert len(named) > 10
    unknown = {pair for pair in named if pair[0] not in env_names_read_by_the_loader()}
    assert not unknown, f"no setting reads these: {sorted(unknown)}"


def test_probes_answer_200_on_the_control_port(tmp_path: Path, redis_server: RedisServer) -> None:
    """``flagproxy serve`` with the ConfigMap and the Secret (its Redis the test's own, ports free):
    each probe of the Deployment answers 200 on the control port, and not on the traffic port."""
    toml = tmp_path / "flagproxy.toml"
    toml.write_text(manifests()["ConfigMap"]["data"][Path(config_path()).name])
    traffic, control = free_port(), free_port()
    env = {
        **secret_env(),
        "FLAGPROXY_STORE_REDIS_URL": redis_server.url,
        "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("deploy"),
        "FLAGPROXY_STORE_SNAPSHOT_PATH": str(tmp_path / "snapshot.json"),
        "FLAGPROXY_STORE_FLAGS_FILE": str(REPO / "seeds" / "flags.json"),  # the image's /app/seeds
        "FLAGPROXY_SERVER_PORT": str(traffic),
    }
    if settings(tmp_path).server.control_port:  # moved to a free port only where the TOML sets one
        env["FLAGPROXY_SERVER_CONTROL_PORT"] = str(control)
    command = [PYTHON, "-m", "proxy", "serve", *container()["args"], "--host", LOCALHOST]
    command[command.index(config_path())] = str(toml)
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        process = subprocess.Popen(command, cwd=REPO, env=clean_env(env), stderr=err)
    try:
        for probe in ("readinessProbe", "livenessProbe"):
            url = f"http://{LOCALHOST}:{control}{container()[probe]['httpGet']['path']}"
            wait_for(lambda u=url: _status(u) == 200, timeout=20, what=f"{url}: {stderr.read_text()}")
            path = container()[probe]["httpGet"]["path"]
            assert httpx.get(f"http://{LOCALHOST}:{traffic}{path}", timeout=5).status_code == 404
    finally:
        process.terminate()
        process.wait(10)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit() -> None:
    service = unit()["Service"]
    assert service["Type"] in ("exec", "notify")
    assert service["Restart"] in ("on-failure", "always")
    assert service["ExecReload"].split()[-2:] == ["-HUP", "$MAINPID"]
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    assert service["EnvironmentFile"] == "/etc/flagproxy/flagproxy.env"
    assert (DEPLOY / "systemd" / "flagproxy.env").exists(), "the EnvironmentFile's example"
    executable, *args = shlex.split(service["ExecStart"])
    assert Path(executable).name == "flagproxy"
    assert build_parser().parse_args(args).command == "serve"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own check; the ExecStart binary must exist for it, so the unit names the venv's."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze on this machine (Debian: apt-get install systemd)")
    executable = str(Path(PYTHON).parent / "flagproxy")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={executable}", UNIT.read_text(), flags=re.M)
    (tmp_path / UNIT.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
