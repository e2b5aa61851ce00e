"""One base class for the caller's errors (kb.errors.KBError): each states its HTTP status once,
the API's one handler and the CLI's exit code 2 follow from it."""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import pytest

from kb.errors import InvalidRequest, KBError, NotFound
from tests.conftest import serving

ROOT = Path(__file__).resolve().parent.parent


def caller_errors() -> dict[str, type]:
    """Every KBError subclass the packages define, by name."""
    import kb.paths
    import retrieval.knowledge_base
    import serve.uploads

    found = {}
    for mod in (kb.paths, retrieval.knowledge_base, serve.uploads):
        found.update({n: c for n, c in vars(mod).items() if isinstance(c, type) and issubclass(c, KBError)
                      and c not in (KBError, InvalidRequest, NotFound)})
    return found


def test_caller_errors_state_their_status_and_keep_their_builtin_bases():
    errors = caller_errors()
    assert {n: (c.status, c.code) for n, c in errors.items()} == {
        "BadKBName": (422, "invalid_request"), "BadChunkText": (422, "invalid_request"),
        "NoSuchKB": (404, "not_found"), "NoSuchChunk": (404, "not_found"),
        "BadFileName": (422, "invalid_request"), "BadUpload": (422, "invalid_request"),
        "NoSuchDocument": (404, "not_found"), "UploadTooLarge": (413, "payload_too_large")}
    assert issubclass(errors["NoSuchKB"], LookupError) and issubclass(errors["BadKBName"], ValueError)


def test_no_other_status_table_maps_error_classes():
    """The statuses live on the classes: no module keeps a class -> status dict beside them."""
    for path in (ROOT / "serve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Name) for k in node.keys):
                assert not any(k.id in caller_errors() for k in node.keys), f"{path}: a status table"


def test_the_api_answers_each_caller_error_with_its_class_status(settings, monkeypatch):
    """One route raising each error class in turn: the status and code are the class's, the
    message its own (NoSuchKB's names the KB, never the data folder)."""
    from fastapi import APIRouter

    from serve.api import create_app

    monkeypatch.setenv("KB_API_KEYS", '{"k": ["*:rw"]}')
    app = create_app(settings)
    router = APIRouter()
    errors = caller_errors()

    @router.get("/raise/{name}")
    def raise_it(name: str):
        raise errors[name](f"secret path {settings.home} for {name}")

    app.include_router(router)
    with serving(app) as url:
        for name, cls in errors.items():
            r = httpx.get(f"{url}/raise/{name}", headers={"Authorization": "Bearer k"})
            body = r.json()
            assert r.status_code == cls.status, name
            assert body["error"]["code"] == cls.code, name
            if name == "NoSuchKB":
                assert str(settings.home) not in r.text
            else:
                assert name in body["error"]["message"]


@pytest.mark.parametrize("argv", [["search", "x", "--kb", "bad/name"], ["chunks", "--kb", "nope", "--doc", "d"]])
def test_the_cli_exits_2_with_the_message(settings, capsys, argv):
    from cli.main import main as kb_main

    assert kb_main(argv) == 2
    assert capsys.readouterr().err.startswith("kb: error:")
