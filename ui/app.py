"""Streamlit app for staff: ask questions with streamed, cited answers; manage knowledge bases.

Run with `kb ui` (or `streamlit run ui/app.py -- --config FILE`).
"""

from __future__ import annotations

import argparse
import io
import sys

import streamlit as st

import kb  # noqa: F401  (offline environment)
from kb.settings import load_settings
from serve.service import Service


def _config_path() -> str | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    return p.parse_known_args(sys.argv[1:])[0].config


@st.cache_resource(show_spinner="Loading models…")
def service(config: str | None) -> Service:
    return Service(load_settings(config))


def sidebar(svc: Service) -> str | None:
    st.sidebar.title("Knowledge base")
    names = [k["name"] for k in svc.kbs()]
    new = st.sidebar.text_input("New knowledge base", placeholder="name, then upload documents")
    options = names + ([new] if new and new not in names else [])
    if not options:
        st.sidebar.info("No knowledge base yet: type a name above and upload documents.")
        return None
    default = options.index(st.session_state.get("kb", options[-1] if new else options[0])) \
        if st.session_state.get("kb") in options else (len(options) - 1 if new else 0)
    name = st.sidebar.selectbox("Knowledge base", options, index=default, key="kb_select")
    if st.session_state.get("kb") != name:
        st.session_state.kb = name
        st.session_state.messages = []
    st.sidebar.selectbox("Dialogue stage", ["(none)", "pre_sale", "after_sale"], key="stage")
    return name


def documents_tab(svc: Service, name: str) -> None:
    ups = st.file_uploader("Upload documents", accept_multiple_files=True, key=f"up_{name}")
    if ups and st.button(f"Ingest {len(ups)} file(s)", type="primary"):
        bar = st.progress(0.0, text="starting…")
        done: list[str] = []

        def on_file(source: str, status: str) -> None:
            if status in ("ingested", "skipped") or status.startswith("failed"):
                done.append(source)
            bar.progress(min(1.0, len(done) / len(ups)), text=f"{source}: {status}")

        with st.status("Ingesting…", expanded=True) as box:
            try:
                out = svc.upload(name, [(u.name, io.BytesIO(u.getvalue())) for u in ups], on_file=on_file)
            except ValueError as e:  # too large, bad name
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
    if docs:
        labels = {f"{d['source']} ({d['doc_id']})": d["doc_id"] for d in docs}
        pick = st.selectbox("Document", list(labels), key=f"del_{name}")
        if st.button("Delete document"):
            svc.remove_document(name, labels[pick])
            st.success(f"deleted {pick}")
            st.rerun()


def show_sources(result: dict) -> None:
    if result.get("fallback"):
        st.caption(f"Fallback reply: {result['reason']}")
    for i, h in enumerate(result.get("sources", [])):
        with st.expander(f"[{i + 1}] {h['source']} · score {h['score']:.3f}"):
            st.write(h["text"])


def chat_tab(svc: Service, name: str) -> None:
    msgs = st.session_state.setdefault("messages", [])
    for m in msgs:
        with st.chat_message(m["role"]):
            st.markdown(m["content"])
            if m["role"] == "assistant":
                show_sources(m["result"])
    question = st.chat_input("Ask a question about the documents")
    if not question:
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
    msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": result["answer"], "result": result}]


def main() -> None:
    st.set_page_config(page_title="Knowledge base", layout="wide")
    svc = service(_config_path())
    name = sidebar(svc)
    if name is None:
        st.title("Knowledge base")
        return
    st.title(name)
    chat, docs = st.tabs(["Ask", "Documents"])
    with docs:
        documents_tab(svc, name)
    with chat:
        chat_tab(svc, name)


main()
