"""Streamlit app for staff: ask questions with streamed, cited answers; manage knowledge bases.

Run with `kb ui` (or `streamlit run ui/app.py -- --config FILE`). Staff log in with an API key from
`serve.api_keys` / KB_API_KEYS: the page lists only the knowledge bases the key may read and offers
upload, delete and new knowledge bases only where it may write; every action checks again.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from collections.abc import Collection

import streamlit as st

import kb  # noqa: F401  (offline environment)
from kb.paths import check_kb_name
from kb.settings import ConfigError, load_settings
from serve.auth import Grant, KeyRing
from serve.service import Service

log = logging.getLogger("ui.app")
# (no bare strings at module level: streamlit's magic would show them on the page)
LOGIN_DELAY_S = 1.0  # pause after a failed login, doubled for each further one in the session...
LOGIN_DELAY_MAX_S = 8.0  # ...up to this


# what a key may see and do (plain functions, tested without a browser) ----------------------------
def visible_kbs(grant: Grant, names: Collection[str]) -> list[str]:
    """The knowledge bases among `names` that the key may read, in their order."""
    return [n for n in names if grant.can_read(n)]


def may_create(grant: Grant, existing: Collection[str]) -> bool:
    """Whether to offer a new knowledge base: the key may write some name that does not exist yet."""
    return "*" in grant.write or any(w not in existing for w in grant.write)


def authorize(grant: Grant | None, name: str, write: bool = False) -> str:
    """`name` if it is a valid KB name (else BadKBName) that the key may read, or with `write`
    change (else PermissionError); checked again right before every action."""
    if grant is None:
        raise PermissionError("not logged in")
    check_kb_name(name)
    if not (grant.can_write(name) if write else grant.can_read(name)):
        raise PermissionError(f"this key may not {'change' if write else 'read'} knowledge base {name!r}")
    return name


def login_delay(failures: int) -> float:
    """Seconds to wait after the session's `failures`-th failed login."""
    return min(LOGIN_DELAY_S * 2 ** max(failures - 1, 0), LOGIN_DELAY_MAX_S)


# the page ------------------------------------------------------------------------------------------
def _config_path() -> str | None:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config")
    return p.parse_known_args(sys.argv[1:])[0].config


@st.cache_resource(show_spinner="Loading models…")
def service(config: str | None) -> Service:
    """The Service of the configuration `config`, cached across reruns and sessions."""
    return Service(load_settings(config))


@st.cache_resource(show_spinner=False)
def keyring(config: str | None) -> KeyRing:
    """The API's keys (ConfigError when there are none: the app does not run without them)."""
    return KeyRing.required(load_settings(config))


def allowed(grant: Grant, name: str, write: bool = False) -> bool:
    """Whether the key may do it now; shows why not."""
    try:
        authorize(grant, name, write)
    except (PermissionError, ValueError) as e:
        st.error(str(e))
        return False
    return True


def login(keys: KeyRing) -> Grant | None:
    """The session's grant; or the login form (and None) while the session has no valid key."""
    grant = keys.grant(st.session_state.get("api_key"))
    if grant is not None:
        return grant
    st.session_state.pop("api_key", None)
    st.title("Knowledge base")
    with st.form("login", clear_on_submit=True):
        key = st.text_input("API key", type="password")
        submitted = st.form_submit_button("Log in", type="primary")
    if not submitted:
        return None
    grant = keys.grant(key)
    if grant is None:
        failures = st.session_state["failed_logins"] = st.session_state.get("failed_logins", 0) + 1
        log.warning("failed UI login from %s (%d in this session)", st.context.ip_address or "localhost", failures)
        time.sleep(login_delay(failures))
        st.error("Invalid API key.")
        return None
    st.session_state.api_key = key
    st.session_state.failed_logins = 0
    st.rerun()


def logout() -> None:
    """Forget the session (the key, the KB choice and the chat)."""
    st.session_state.clear()


def sidebar(svc: Service, grant: Grant) -> str | None:
    """The sidebar (log out, pick or create a KB, dialogue stage); the chosen KB name or None."""
    st.sidebar.title("Knowledge base")
    st.sidebar.button("Log out", on_click=logout)
    existing = [k["name"] for k in svc.kbs()]
    names = visible_kbs(grant, existing)
    new = ""
    if may_create(grant, existing):
        new = st.sidebar.text_input("New knowledge base", placeholder="name, then upload documents")
        if new and new not in names:
            try:
                authorize(grant, new, write=True)
            except (PermissionError, ValueError) as e:
                st.sidebar.error(str(e))
                new = ""
    options = names + ([new] if new and new not in names else [])
    if not options:
        st.sidebar.info("No knowledge base yet: type a name above and upload documents." if may_create(grant, existing)
                        else "This key may not read any knowledge base.")
        return None
    default = options.index(st.session_state.get("kb", options[-1] if new else options[0])) \
        if st.session_state.get("kb") in options else (len(options) - 1 if new else 0)
    name = st.sidebar.selectbox("Knowledge base", options, index=default, key="kb_select")
    if st.session_state.get("kb") != name:
        st.session_state.kb = name
        st.session_state.messages = []
    st.sidebar.selectbox("Dialogue stage", ["(none)", "pre_sale", "after_sale"], key="stage")
    return name


def documents_tab(svc: Service, name: str, grant: Grant) -> None:
    """The Documents tab: upload and ingest files, list and delete documents, show and edit chunks."""
    write = grant.can_write(name)
    ups = st.file_uploader("Upload documents", accept_multiple_files=True, key=f"up_{name}") if write else None
    replace = replace_choice(svc, name, ups[0].name) if ups and len(ups) == 1 else None
    if ups and st.button(f"Ingest {len(ups)} file(s)", type="primary") and allowed(grant, name, write=True):
        bar = st.progress(0.0, text="starting…")
        done: list[str] = []

        def on_file(source: str, status: str) -> None:
            if status in ("ingested", "skipped") or status.startswith("failed"):
                done.append(source)
            bar.progress(min(1.0, len(done) / len(ups)), text=f"{source}: {status}")

        with st.status("Ingesting…", expanded=True) as box:
            try:
                out = svc.upload(name, [(u.name, io.BytesIO(u.getvalue())) for u in ups], on_file=on_file,
                                 replace=replace)
            except (ValueError, LookupError) as e:  # too large, bad name, the replaced document is gone
                box.update(label=str(e), state="error")
                return
            bar.progress(1.0, text="done")
            summary = (f"Ingestion finished: {out['ingested']} ingested, {out['skipped']} unchanged, "
                       f"{len(out['failed'])} failed, {out['chunks']} chunks")
            for f in out["failed"]:
                box.error(f"{f['path']}: {f['error']}")
            box.update(label=summary, state="error" if out["failed"] else "complete", expanded=bool(out["failed"]))
    try:
        docs = svc.kb(name).documents()
    except LookupError:
        st.info("This knowledge base is empty: upload documents to create it.")
        return
    st.dataframe([{k: d[k] for k in ("source", "title", "n_chunks", "doc_id")} for d in docs],
                 use_container_width=True, hide_index=True)
    if docs and write:
        labels = {f"{d['source']} ({d['doc_id']})": d["doc_id"] for d in docs}
        pick = st.selectbox("Document", list(labels), key=f"del_{name}")
        if st.button("Delete document") and allowed(grant, name, write=True):
            svc.remove_document(name, labels[pick])
            st.success(f"deleted {pick}")
            st.rerun()
    if docs:
        chunks_section(svc, name, grant, docs)


def chunk_rows(view: dict) -> list[dict]:
    """One table row per chunk of `KnowledgeBase.chunks`: its text and key information, who edited it."""
    return [{"ord": c["ord"], "text": c["text"], "keywords": ", ".join((c["key_info"] or {}).get("keywords", [])),
             "entities": ", ".join((c["key_info"] or {}).get("entities", [])),
             "summary": (c["key_info"] or {}).get("summary", ""),
             "edited": f"{c['edited']['user']} at {c['edited']['at']}" if c["edited"] else ""}
            for c in view["chunks"]]


def chunks_section(svc: Service, name: str, grant: Grant, docs: list[dict]) -> None:
    """A document's chunks with their key information; a key that may write edits a chunk's text."""
    from serve.api import key_user

    st.subheader("Chunks")
    if saved := st.session_state.pop("chunk_saved", None):
        st.success(saved)
    labels = {f"{d['source']} ({d['doc_id']})": d["doc_id"] for d in docs}
    doc_id = labels[st.selectbox("Show the chunks of", list(labels), key=f"chunks_doc_{name}")]
    try:
        view = svc.kb(name).chunks(doc_id)
    except LookupError as e:  # removed meanwhile
        st.info(str(e))
        return
    if view["article"]:
        st.caption(f"Document keywords: {', '.join(view['article']['keywords'])} · "
                   f"entities: {', '.join(view['article']['entities']) or '-'}")
    st.dataframe(chunk_rows(view), use_container_width=True, hide_index=True)
    if not grant.can_write(name) or not view["chunks"]:
        return
    by_ord = {c["ord"]: c for c in view["chunks"]}
    ord_ = st.selectbox("Edit chunk", list(by_ord), key=f"chunk_ord_{name}_{doc_id}")
    with st.form(f"edit_{name}_{doc_id}_{ord_}"):
        text = st.text_area("Chunk text", by_ord[ord_]["text"], height=200)
        who = st.text_input("Your name (recorded with the edit)", value=st.session_state.get("editor", ""))
        save = st.form_submit_button("Save chunk")
    if save and allowed(grant, name, write=True):
        st.session_state.editor = who
        try:
            out = svc.kb(name).edit_chunk(doc_id, ord_, text, key_user(st.session_state.get("api_key", ""), who))
        except (ValueError, LookupError) as e:  # empty or too long; the document or chunk is gone
            st.error(str(e))
            return
        st.session_state.chunk_saved = (f"Saved chunk {ord_} of {view['source']} as {out['user']}" if out["changed"]
                                        else f"Chunk {ord_} already has this text")
        st.rerun()


def replace_choice(svc: Service, name: str, filename: str) -> str | None:
    """The document a single upload is a new version of (None: a new document; a document of the
    same file name is offered first). Documents are identified by content, so an edited file is
    otherwise a second document beside the old one."""
    try:
        docs = svc.kb(name).documents()
    except LookupError:
        return None
    labels = {"(a new document)": None} | {f"{d['source']} ({d['doc_id']})": d["doc_id"] for d in docs}
    same = next((k for k, v in labels.items() if v and k.startswith(f"{filename} (")), None)
    pick = st.selectbox("New version of", list(labels), index=list(labels).index(same) if same else 0,
                        key=f"replace_{name}")
    return labels[pick]


def show_sources(result: dict) -> None:
    """The fallback reason, if any, and each source of a reply in an expander."""
    if result.get("fallback"):
        st.caption(f"Fallback reply: {result['reason']}")
    for i, h in enumerate(result.get("sources", [])):
        with st.expander(f"[{i + 1}] {h['source']} · score {h['score']:.3f}"):
            st.write(h["text"])


def chat_tab(svc: Service, name: str, grant: Grant) -> None:
    """The Ask tab: the chat so far, then a new question's answer streamed, with its sources."""
    msgs = st.session_state.setdefault("messages", [])
    for m in msgs:
        with st.chat_message(m["role"]):
            st.markdown(m["content"])
            if m["role"] == "assistant":
                show_sources(m["result"])
    question = st.chat_input("Ask a question about the documents")
    if not question or not allowed(grant, name):
        return
    with st.chat_message("user"):
        st.markdown(question)
    history = [[a["content"], b["content"]] for a, b in zip(msgs[::2], msgs[1::2])]
    stage = None if st.session_state.get("stage") in (None, "(none)") else st.session_state.stage
    result: dict = {}

    def pieces():
        for p in svc.chain(name).stream(question, history, stage):
            if isinstance(p, dict):
                result.update(p)
            else:
                yield p

    with st.chat_message("assistant"):
        box = st.empty()  # the model's text as it is generated (answer.stream_mode)
        try:
            with box:
                st.write_stream(pieces())
        except LookupError as e:
            st.error(str(e))
            return
        if result.get("replace"):  # what was shown failed the final compliance check
            box.markdown(result["answer"])
        show_sources(result)
    msgs += [{"role": "user", "content": question},
             {"role": "assistant", "content": result["answer"], "result": result}]


def main() -> None:
    """The app: log in with a key, pick a knowledge base, then the Ask and Documents tabs."""
    st.set_page_config(page_title="Knowledge base", layout="wide")
    config = _config_path()
    try:
        keys = keyring(config)
    except ConfigError as e:
        st.error(f"The app cannot start: {e}")
        st.stop()
    grant = login(keys)
    if grant is None:
        return
    svc = service(config)
    name = sidebar(svc, grant)
    if name is None:
        st.title("Knowledge base")
        return
    if not allowed(grant, name):
        return
    st.title(name)
    chat, docs = st.tabs(["Ask", "Documents"])
    with docs:
        documents_tab(svc, name, grant)
    with chat:
        chat_tab(svc, name, grant)


if __name__ == "__main__":  # streamlit runs the script as __main__; tests import its functions
    main()
