"""`polymodal serve` as a user runs it: a subprocess on a free loopback port, one JSON log line per
request, Ctrl-C to stop; and its options' defaults and errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from polymodal.cli import build_parser, main
from polymodal.serve.background import free_port
from polymodal.serve.cli import model_name


def test_defaults_bind_to_loopback_without_a_key():
    args = build_parser().parse_args(["serve", "ckpt"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, None, 16, 64)


def test_bad_options_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "ckpt", "--max-batch", "0"])
    assert "must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", "/no/such/checkpoint"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "polymodal serve: error: no checkpoint at /no/such/checkpoint"


def test_model_name_of_a_recipe_run_is_the_run(tmp_path):
    (tmp_path / "my-run" / "final").mkdir(parents=True)
    assert model_name(str(tmp_path / "my-run" / "final")) == "my-run"
    assert model_name(str(tmp_path / "my-run")) == "my-run"


def test_the_command_serves_logs_each_request_and_stops_on_ctrl_c(checkpoints):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "polymodal.cli", "serve", str(checkpoints["slow_lm"]),
                                "--port", str(port), "--api-key", "k", "--max-batch", "4"],
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "slow_lm"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    statuses = [(line["path"], line["status"]) for line in lines]
    assert ("/v1/models", 200) in statuses and ("/v1/models", 401) in statuses
    assert all({"request", "method", "status", "ms"} <= set(line) for line in lines)
    assert "Traceback" not in err
