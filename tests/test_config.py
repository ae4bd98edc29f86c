"""config.toml: the default file is valid, and every bad value is named with its fix."""

import socket
from pathlib import Path

import pytest
import torch

from node.config import ConfigError, load_config
from tests.support.models import add_model, make_registry
from tests.support.nodeproc import free_port, run_dicomnode
from tests.support.paths import REPO

VALID = """
[node]
port = 11112
[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[[routes]]
name = "t1"
direction = "t1-to-t2"
destinations = ["pacs"]
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_shipped_config_is_valid():
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "SYNTH"
    assert config.node.port == 11112
    assert [r.direction for r in config.routes] == ["t1-to-t2", "t2-to-t1"]
    assert all(r.destinations == ["pacs"] for r in config.routes)
    # Relative paths are resolved against the file's folder, not the working directory.
    assert config.node.storage == REPO / "var" / "spool"
    assert config.node.database == f"sqlite:///{REPO}/var/dicomnode.sqlite"


def test_every_problem_is_reported_with_its_key(tmp_path):
    found = problems(
        tmp_path,
        VALID.replace(
            "port = 11112", 'port = 70000\nae_tittle = "X"\nallowed_callers = ["A@"]'
        ).replace('direction = "t1-to-t2"', 'direction = "t1-t2"'),
    )
    text = "\n".join(found)
    assert "node.port = 70000" in text and "less than or equal to 65535" in text
    assert "node.ae_tittle: unknown key" in text
    assert "node.allowed_callers" in text and "'A@'" in text
    assert "routes[0].direction = 't1-t2'" in text and "'t1-to-t2' or 't2-to-t1'" in text
    assert len(found) == 4


def test_connection_timeouts_are_checked_by_name(tmp_path):
    found = problems(
        tmp_path,
        VALID.replace(
            "port = 11112",
            "port = 11112\npdu_timeout_seconds = 0\nassociation_request_timeout_seconds = -1",
        ),
    )
    assert [p.split(":")[0] for p in found] == [
        "node.pdu_timeout_seconds = 0",
        "node.association_request_timeout_seconds = -1",
    ]
    assert all("greater than 0" in p for p in found)


def test_route_to_unknown_destination(tmp_path):
    found = problems(tmp_path, VALID.replace('destinations = ["pacs"]', 'destinations = ["pacz"]'))
    assert found == [
        "routes[0].destinations: 'pacz' is not a [destinations.NAME] section (defined: pacs)"
    ]


def test_duplicate_route_names(tmp_path):
    doubled = VALID + VALID[VALID.index("[[routes]]") :]
    assert problems(tmp_path, doubled) == ["routes[1].name = 't1': used by an earlier route"]


def test_not_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in problems(tmp_path, "[node\nport=1")[0]
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def free_ports(text: str) -> str:
    """``text`` listening on free ports: `config check` tries to listen where it says."""
    return text.replace("port = 11112", f"port = {free_port()}") + f"[http]\nport = {free_port()}\n"


def test_config_check_command(tmp_path):
    make_registry(tmp_path / "models")
    good = tmp_path / "good.toml"
    good.write_text(free_ports(VALID))
    result = run_dicomnode("config", "check", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "OK (1 route(s), 1 destination(s))" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(VALID.replace("port = 4242", 'port = "x"'))
    result = run_dicomnode("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "destinations.pacs.port = 'x'" in result.stderr


def test_config_check_names_what_serve_would_die_of(tmp_path):
    """Each problem of this machine for the file, one line naming its key."""
    make_registry(tmp_path / "models")
    (tmp_path / "a-file").write_text("")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(
        VALID.replace(
            "port = 11112", f'host = "127.0.0.1"\nport = {port}\nstorage = "a-file/spool"'
        ).replace("[destinations.pacs]", '[destination.pacs]\nae_title = "X"\n[destinations.pacs]')
    )
    result = run_dicomnode("config", "check", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[destination.pacs]: unknown section, did you mean [destinations.pacs]?" in result.stderr

    config.write_text(
        VALID.replace(
            "port = 11112", f'host = "127.0.0.1"\nport = {port}\nstorage = "a-file/spool"'
        )
        + f"[http]\nport = {free_port()}\n"
    )
    result = run_dicomnode("config", "check", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"node.storage = '{tmp_path}/a-file/spool': {tmp_path}/a-file is a file" in result.stderr
    assert f"node.port = {port}: 127.0.0.1:{port} is in use" in result.stderr
    busy.close()

    # sysfs takes no files, not even root's: the check is by writing, as serve would.
    text = free_ports(VALID).replace("[node]\n", '[node]\nstorage = "/sys/dicomnode/spool"\n')
    config.write_text(text)
    result = run_dicomnode("config", "check", "--config", str(config))
    assert "node.storage = '/sys/dicomnode/spool': cannot be created in /sys" in result.stderr

    text = free_ports(VALID).replace(
        "[node]\n", '[node]\ndatabase = "postgresql+nosuchdriver://u@h/db"\n'
    )
    config.write_text(text)
    result = run_dicomnode("config", "check", "--config", str(config))
    assert "node.database = 'postgresql+nosuchdriver://u@h/db'" in result.stderr

    text = free_ports(VALID).replace("port = 4242", 'port = "4242"')
    config.write_text(text)
    result = run_dicomnode("config", "check", "--config", str(config))
    assert "destinations.pacs.port = '4242': a number, written without quotes (port = 4242)" in (
        result.stderr
    )

    config.write_text(free_ports(VALID) + '[worker]\ndevice = "cuda"\n')
    result = run_dicomnode("config", "check", "--config", str(config))
    named = 'worker.device = "cuda": torch ' in result.stderr
    assert named == (not torch.cuda.is_available())  # named only where torch has no CUDA

    text = free_ports(VALID)
    config.write_text(text[: text.index("[[routes]]")] + text[text.index("[http]") :])
    result = run_dicomnode("config", "check", "--config", str(config))
    assert "warning: routes: none defined, so every series received would be ignored" in (
        result.stdout
    )


def test_serve_refuses_to_start_on_a_bad_config(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text(VALID.replace('direction = "t1-to-t2"', 'direction = "sideways"'))
    result = run_dicomnode("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "routes[0].direction = 'sideways'" in result.stderr


def test_a_missing_or_wrong_model_stops_serve_at_start(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(VALID)
    result = run_dicomnode("serve", "--config", str(config))
    assert result.returncode == 2
    assert "routes[0].model = 't1-to-t2': model 't1-to-t2' has no active version" in result.stderr

    # The registry's t1-to-t2 name holds a model that synthesizes the other way.
    registry = make_registry(tmp_path / "models")
    add_model(registry, "t1-to-t2", "v2")
    wrong = registry.path("t1-to-t2", "v2")
    wrong.write_bytes(registry.path("t2-to-t1", "v1").read_bytes())
    (registry.root / "t1-to-t2" / "ACTIVE").write_text("v2")
    result = run_dicomnode("config", "check", "--config", str(config))
    assert result.returncode == 2
    assert "synthesizes t2-to-t1, but route 't1' has direction t1-to-t2" in result.stderr


def test_routes_that_cannot_make_sense_are_refused_by_config_check_and_serve(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        VALID
        + """
[[routes]]
name = "t2-into-t1-to-t2"
direction = "t1-to-t2"
contrast = ["T1", "T2"]
destinations = ["pacs"]

[[routes]]
name = "takes-other"
direction = "t2-to-t1"
contrast = ["T2", "OTHER"]
destinations = ["pacs"]

[[routes]]
name = "t1c-into-t2-to-t1"
direction = "t2-to-t1"
contrast = ["T1C"]
destinations = ["pacs"]
"""
    )
    expected = [
        "routes[1].contrast: T2 contradicts direction t1-to-t2, which synthesizes T2 from T1 "
        "(route 't2-into-t1-to-t2')",
        "routes[2].contrast: OTHER takes what the node cannot classify, its own synthetic "
        "output included",
        "(route 'takes-other')",
        "routes[3].contrast: T1C contradicts direction t2-to-t1, which synthesizes T1 from T2 "
        "(route 't1c-into-t2-to-t1')",
    ]
    for command in ("config check", "serve"):
        result = run_dicomnode(*command.split(), "--config", str(config))
        assert result.returncode == 2, command
        assert "4 problem(s)" not in result.stderr and "3 problem(s)" in result.stderr
        for line in expected:
            assert line in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr


def test_refresh_settings_are_checked_and_resolved(tmp_path):
    found = problems(tmp_path, VALID + '\n[refresh]\nenabled = true\ntime = "25:00"\n')
    assert found == ["refresh.time = '25:00': '25:00' is not a time of day HH:MM (e.g. \"02:00\")"]
    found = problems(tmp_path, VALID + '\n[refresh]\nenabled = true\ndata = ["studies"]\n')
    assert found == [f"refresh.data: {tmp_path / 'studies'} is not a folder"]
    (tmp_path / "studies").mkdir()
    path = tmp_path / "config.toml"
    config = load_config(path)
    assert config.refresh.data == [tmp_path / "studies"] and config.refresh.time == "02:00"


def test_uncertainty_cost_is_bounded_and_routes_that_need_it_name_it(tmp_path):
    costly = "[uncertainty]\npasses = 3\n" + VALID
    assert problems(tmp_path, costly) == [
        "uncertainty = {'passes': 3}: passes = 3 costs 4 plain syntheses, more than max_cost = 3"
    ]
    allowed = "[uncertainty]\npasses = 3\nmax_cost = 4\n" + VALID
    path = tmp_path / "allowed.toml"
    path.write_text(allowed)
    assert load_config(path).uncertainty.passes == 3
    without = "[uncertainty]\nenabled = false\n" + VALID + "hold_uncertainty_above = 0.1\n"
    assert problems(tmp_path, without) == [
        "routes[0]: hold_uncertainty_above and send_uncertainty need [uncertainty] "
        "enabled = true (route 't1')"
    ]


def test_a_refresh_may_train_on_the_harvest_alone_if_there_is_one(tmp_path):
    refresh = "\n[refresh]\nenabled = true\nharvested = true\n"
    assert problems(tmp_path, VALID + refresh) == [
        "refresh.harvested: true, but [harvest] enabled = false harvests nothing"
    ]
    path = tmp_path / "harvesting.toml"
    path.write_text(VALID + refresh + "\n[harvest]\nenabled = true\n")
    assert load_config(path).refresh.harvested
