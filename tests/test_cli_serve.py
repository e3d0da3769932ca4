"""The Ollama-style commands against a real `tunesmith serve` on a free loopback port."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.serve_fixtures import free_port, start_server_process


@pytest.fixture
def server(tmp_path):
    server = start_server_process(tmp_path)
    yield {"TUNESMITH_HOST": f"127.0.0.1:{server.port}", "TUNESMITH_MODELS": str(tmp_path / "models")}, server.port
    server.stop()


def test_create_list_show_run_cp_rm(server, tmp_path, smollm2_gguf):
    env, _port = server
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {smollm2_gguf}\nPARAMETER temperature 0\nPARAMETER num_predict 8\n"
                         "SYSTEM You answer in one word.\n")
    done = run_cli("create", "smol", "-f", str(modelfile), env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    listed = run_cli("list", env=env)
    assert listed.returncode == 0 and "smol:latest" in listed.stdout

    shown = run_cli("show", "smol", "--modelfile", env=env)
    assert shown.returncode == 0 and "PARAMETER temperature 0" in shown.stdout and "You answer in one word." in shown.stdout

    answered = run_cli("run", "smol", "Say hello", env=env)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()  # a real (if small-model) answer came back through /api/chat

    assert "smol:latest" in run_cli("ps", env=env).stdout  # loaded by the run above
    assert run_cli("cp", "smol", "smol2", env=env).returncode == 0
    assert run_cli("rm", "smol", env=env).returncode == 0
    listed = run_cli("list", env=env).stdout
    assert "smol2:latest" in listed and "smol:latest" not in listed

    missing = run_cli("show", "nope", env=env)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_client_commands_say_in_one_line_when_no_server_answers():
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["list"], ["show", "smol"], ["rm", "smol"]):
        done = run_cli(*args, env={"TUNESMITH_HOST": host})
        assert done.returncode == 2, (args, done.stderr)
        assert f"could not reach the server at http://{host}" in done.stderr and "Traceback" not in done.stderr


def test_the_pipelines_server_listens_where_serve_host_says(tmp_path):
    """serve.host: 0.0.0.0 makes the pipeline's background server listen on every interface (it used to bind
    loopback whatever the config said), reached by the pipeline itself on loopback."""
    import psutil

    from tunesmith.config import Config
    from tunesmith.local_server import server_at
    from tunesmith.pipeline import _host

    port = free_port()
    config = Config.model_validate({"serve": {"host": "0.0.0.0", "port": port, "api_key": "k" * 16}})
    host = _host(config)
    assert host == f"http://127.0.0.1:{port}"
    with server_at(host, config.serve) as server:
        assert server is not None
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(server.pid).net_connections()
                     if c.status == psutil.CONN_LISTEN}
        assert ("0.0.0.0", port) in listening
