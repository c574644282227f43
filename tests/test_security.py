"""The server serves no file outside its cache, user input never reaches a shell, and nothing unpickles."""

import ast
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from app_fixtures import app_assets, running_app  # noqa: F401  (fixtures; also sets the offline env)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "/etc/passwd"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize(
    "path",
    [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=../../../../../../etc/passwd",
        "gradio_api/file=" + urllib.parse.quote("/etc/passwd", safe=""),
        "gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "file=/etc/passwd",
        "gradio_api/file=app.py",
        "gradio_api/file=" + str(ROOT / "app.py"),
        "gradio_api/file=" + str(ROOT / "assets" / "model" / "unet" / "config.json"),
        "static/../../../../etc/passwd",
        "assets/../../../../etc/passwd",
        "gradio_api/file=~/.bashrc",
    ],
)
def test_path_traversal_is_refused(running_app, path):  # noqa: F811
    status, body = _get(running_app.url + path)
    assert b"root:x:0:0" not in body and b"argparse" not in body and b"UNet2DModel" not in body
    assert status in (400, 403, 404, 405), f"{path} answered {status}"


def test_no_shell_and_no_pickle_in_code():
    """Static check of the shipped code: no subprocess/os.system/eval/exec, no pickle or torch.load."""
    forbidden_builtins = {"eval", "exec", "compile", "__import__"}
    forbidden_methods = {"system", "popen", "spawnl", "spawnv", "execv", "execl"}
    for path in [ROOT / "app.py", *sorted((ROOT / "explorer").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", "") or ""]
                assert not {"subprocess", "pickle", "shelve", "marshal"} & set(names), (
                    f"{path.name} imports {names}"
                )
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if isinstance(node.func, ast.Name):
                    assert name not in forbidden_builtins, f"{path.name}:{node.lineno} calls {name}"
                else:
                    assert name not in forbidden_methods, f"{path.name}:{node.lineno} calls {name}"
                if name == "load" and getattr(getattr(node.func, "value", None), "id", "") == "torch":
                    raise AssertionError(f"{path.name}:{node.lineno} calls torch.load (pickle)")
                if name == "load" and getattr(getattr(node.func, "value", None), "id", "") == "np":
                    keywords = {k.arg: k.value for k in node.keywords}
                    value = keywords.get("allow_pickle")
                    assert isinstance(value, ast.Constant) and value.value is False, (
                        f"{path.name}:{node.lineno} np.load without allow_pickle=False"
                    )


def _call(url: str, api_name: str, data: list) -> str:
    """A raw API call (no gradio_client, which would upload local files itself): the SSE stream's text."""
    import json

    request = urllib.request.Request(
        f"{url}gradio_api/call/{api_name}",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        return response.read().decode()


def test_attribute_image_refuses_server_paths(running_app):  # noqa: F811
    """preprocess=False skips gradio's own path check: a crafted FileData path must still be refused."""
    name = next(iter(running_app.explorer.indexes))
    digit = ROOT / "docs" / "screenshot.png"  # a real image on the server, outside the upload folder
    for path in (str(digit), SECRET, "../../../etc/passwd"):
        stream = _call(
            running_app.url,
            "attribute_image",
            [{"path": path, "meta": {"_type": "gradio.FileData"}}, 100, 5, name],
        )
        # gradio refuses to move a non-uploaded file into its cache; the handler's own check backs it up
        assert "event: error" in stream and "event: complete" not in stream, stream[:300]
        assert "root:x" not in stream and "data:image/png" not in stream
