"""Triton's logging extension (``LogSettings``) through the stock ``tritonclient``: an operator switches
severities on a running server, as with Triton, instead of restarting it with another COURSEZOO_LOG_LEVEL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

DEFAULTS = {"log_file": "", "log_info": False, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "json"}


def settings(client: triton.InferenceServerClient, change: dict | None = None) -> dict:
    reply = client.update_log_settings(change, as_json=True) if change else client.get_log_settings(as_json=True)
    return {key: next(iter(value.values())) for key, value in reply["settings"].items()}


def probe(client: triton.InferenceServerClient, name: str) -> None:
    """Something the server logs at INFO: an unload of a model it does not have."""
    client.unload_model(name)


def test_severities_switch_at_run_time(start_server: Callable[..., ServerProcess], exported_repo: Path) -> None:
    server = start_server(exported_repo, "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    assert settings(client) == DEFAULTS  # COURSEZOO_LOG_LEVEL unset: WARNING
    assert "logging" in client.get_server_metadata(as_json=True)["extensions"]
    probe(client, "quiet-1")

    assert settings(client, {"log_info": True}) == {**DEFAULTS, "log_info": True}
    probe(client, "heard-1")
    wait_for(lambda: "heard-1" in server.output, "the INFO line once log_info is on")
    assert settings(client, {"log_info": False}) == DEFAULTS
    probe(client, "quiet-2")
    settings(client, {"log_info": True})
    probe(client, "heard-2")
    wait_for(lambda: "heard-2" in server.output, "the INFO line once log_info is on again")
    assert "quiet-1" not in server.output and "quiet-2" not in server.output  # logged in order: they never came
    assert settings(client, {"log_verbose_level": 2})["log_verbose_level"] == 2
    client.close()


@pytest.mark.parametrize(("change", "fragment"), [
    ({"log_file": "/tmp/triton.log"}, "logs go to stderr as JSON lines"),
    ({"log_format": "ISO8601"}, "logs go to stderr as JSON lines"),
    ({"log_info": None}, "'log_info' has no value"),  # tritonclient types the others by their names
    ({"log_info": True, "log_everything": True}, "log setting 'log_everything': expected one of"),
])
def test_a_change_the_server_cannot_make_is_refused_whole(start_server: Callable[..., ServerProcess],
                                                          exported_repo: Path, change: dict, fragment: str) -> None:
    server = start_server(exported_repo, "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    with pytest.raises(InferenceServerException) as info:
        client.update_log_settings(change)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and fragment in info.value.message()
    assert settings(client) == DEFAULTS  # nothing of it applied
    client.close()


def test_changing_them_needs_model_control_reading_does_not(start_server: Callable[..., ServerProcess],
                                                            exported_repo: Path) -> None:
    server = start_server(exported_repo, "--poll-interval-s", "0", "--model-control", "off")
    client = triton.InferenceServerClient(server.target)
    with pytest.raises(InferenceServerException) as info:
        client.update_log_settings({"log_info": True})
    assert info.value.status() == "StatusCode.UNIMPLEMENTED" and "log settings" in info.value.message()
    assert settings(client) == DEFAULTS
    client.close()
