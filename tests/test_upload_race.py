"""dashboard/upload_race.py: a rerun starting must not drop the server's answer with a file's upload URLs."""

from __future__ import annotations

import pytest
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.runtime.forward_msg_queue import ForwardMsgQueue

from dashboard.upload_race import keep_upload_answers


def answer(request_id: str) -> ForwardMsg:
    msg = ForwardMsg()
    msg.file_urls_response.response_id = request_id
    return msg


def delta(text: str, index: int) -> ForwardMsg:
    msg = ForwardMsg()
    msg.delta.new_element.markdown.body = text
    msg.metadata.delta_path[:] = [0, index]
    return msg


def lifecycle() -> ForwardMsg:
    msg = ForwardMsg()
    msg.new_session.page_script_hash = "page"
    return msg


def queued(*msgs: ForwardMsg) -> ForwardMsgQueue:
    queue = ForwardMsgQueue()
    for msg in msgs:
        queue.enqueue(msg)
    return queue


def kinds(queue: ForwardMsgQueue) -> list[str]:
    return [m.WhichOneof("type") for m in queue.flush()]


@pytest.fixture
def patched(monkeypatch) -> type[ForwardMsgQueue]:
    monkeypatch.setattr(ForwardMsgQueue, "clear", ForwardMsgQueue.clear)  # undone after the test
    assert keep_upload_answers()
    return ForwardMsgQueue


def test_streamlit_alone_drops_the_answer_when_a_run_starts():
    # Why the patch exists: if this fails, Streamlit keeps the answer itself and the patch can go.
    clear = getattr(ForwardMsgQueue.clear, "__wrapped__", ForwardMsgQueue.clear)
    queue = queued(lifecycle(), delta("old", 0), answer("r1"))
    clear(queue, retain_lifecycle_msgs=True)
    assert kinds(queue) == ["new_session"]


def test_a_run_starting_keeps_the_answer_and_drops_the_stale_deltas(patched):
    queue = queued(lifecycle(), delta("old", 0), answer("r1"), delta("older", 1), answer("r2"))
    queue.clear(retain_lifecycle_msgs=True)  # what AppSession does when a whole-page run starts
    msgs = queue.flush()
    assert [m.WhichOneof("type") for m in msgs] == ["new_session", "file_urls_response", "file_urls_response"]
    assert [m.file_urls_response.response_id for m in msgs[1:]] == ["r1", "r2"]
    assert len(queue) == 0  # flush still empties the queue: each answer is sent once


def test_a_fragment_run_keeps_the_answer_once(patched):
    queue = queued(answer("r1"), delta("outside the fragment", 0))
    queue.clear(retain_lifecycle_msgs=True, fragment_ids_this_run=["frag"])  # Streamlit keeps it here itself
    assert kinds(queue) == ["file_urls_response", "delta"]


def test_a_plain_clear_still_empties_the_queue(patched):
    queue = queued(lifecycle(), answer("r1"))
    queue.clear()
    assert len(queue) == 0


def test_patching_twice_wraps_once(patched):
    first = ForwardMsgQueue.clear
    assert keep_upload_answers()
    assert ForwardMsgQueue.clear is first
