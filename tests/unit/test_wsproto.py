"""The sans-I/O WebSocket protocol: frame classification, login/subscribe policy, 64008 overlap alignment."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.wsproto import (
    ArgAction,
    ArgRefused,
    ConnCount,
    FrameKind,
    LinkProtocol,
    LoggedIn,
    LoginAction,
    LoginRefused,
    Notice,
    OkxEvent,
    OverlapAligner,
    Request,
    Resend,
    Subscribed,
    Unexpected,
    Unsubscribed,
    arg_action,
    arg_from_key,
    classify,
    counts_against_key,
    handover_args,
    login_action,
    push_arg_key,
)
from ingest.credentials import Credentials, Secret
from ingest.okx import signing
from ingest.okx.channels import SubArg


def _event(raw: dict[str, object]) -> OkxEvent:
    c = classify(orjson.dumps(raw))
    assert c.kind is FrameKind.EVENT and c.event is not None
    return c.event


def _creds() -> Credentials:
    return Credentials(Secret(secrets.token_hex(8)), Secret(secrets.token_hex(16)), Secret(secrets.token_hex(6)))


# ------------------------------------------------------------------------------------------ classification


def test_pong_is_recognised_before_any_json_parsing() -> None:
    assert classify(b"pong").kind is FrameKind.PONG
    assert classify(b"pong ").kind is FrameKind.JUNK


def test_every_real_push_and_event_frame_is_classified(shared_okx: Path) -> None:
    frames = shared_okx / "frames"
    pushes = ["trades.jsonl", "books.jsonl", "tickers.jsonl", "candle1m.jsonl", "orders.jsonl", "trades-all.jsonl"]
    for name in pushes:
        for line in (frames / name).read_bytes().splitlines():
            if line.strip():
                assert classify(line.strip()).kind is FrameKind.PUSH, (name, line[:80])
    events = ["login.jsonl", "errors.jsonl", "issues_ws_errors_converted_from_repr.jsonl",
              "ccxt_2026_subscribe_acks.jsonl", "okx_docs_examples/okxdoc_2025_notice.jsonl",
              "okx_docs_examples/okxdoc_2025_conn-count.jsonl"]
    for name in events:
        for line in (frames / name).read_bytes().splitlines():
            if line.strip() and not line.startswith(b'{"op"'):
                assert classify(line.strip()).kind is FrameKind.EVENT, (name, line[:80])


def test_events_are_parsed_with_code_id_arg_and_conn_id() -> None:
    ev = _event({"id": "1512", "event": "subscribe", "arg": {"channel": "tickers", "instId": "BTC-USDT"},
                 "connId": "accb8e21"})
    assert (ev.event, ev.id, ev.arg, ev.conn_id) == ("subscribe", "1512", SubArg("tickers", "BTC-USDT"), "accb8e21")
    cc = _event({"event": "channel-conn-count-error", "channel": "orders", "connCount": "30", "connId": "a"})
    assert (cc.channel, cc.conn_count) == ("orders", "30")


def test_a_push_with_another_key_order_is_still_a_push_and_junk_is_junk() -> None:
    assert classify(b'{"data":[],"arg":{"channel":"trades","instId":"X"}}').kind is FrameKind.PUSH
    for junk in (b"", b"[1,2]", b"{not json", b'{"foo":1}'):
        assert classify(junk).kind is FrameKind.JUNK


def test_push_arg_key_is_the_raw_arg_object_and_maps_back_to_the_subarg() -> None:
    data = b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"tradeId":"1"}]}'
    key = push_arg_key(data)
    assert key == b'{"channel":"trades","instId":"BTC-USDT"}'
    assert arg_from_key(key) == SubArg("trades", inst_id="BTC-USDT")
    reordered = push_arg_key(b'{"data":[],"arg":{"instId":"BTC-USDT","channel":"trades"}}')
    assert reordered is not None and arg_from_key(reordered) == SubArg("trades", inst_id="BTC-USDT")


# ------------------------------------------------------------------------------------------ policy


@pytest.mark.parametrize(
    ("code", "action"),
    [("60005", LoginAction.FATAL), ("60007", LoginAction.FATAL), ("60024", LoginAction.FATAL),
     ("60032", LoginAction.FATAL), ("60006", LoginAction.RESYNC_CLOCK), ("60004", LoginAction.RESYNC_CLOCK),
     ("60009", LoginAction.RETRY), ("63999", LoginAction.RETRY), ("60023", LoginAction.RETRY),
     (None, LoginAction.RETRY)],
)
def test_login_error_policy(code: str | None, action: LoginAction) -> None:
    assert login_action(code) is action


@pytest.mark.parametrize(
    ("code", "action"),
    [("64003", ArgAction.FAIL), ("60018", ArgAction.FAIL), ("64001", ArgAction.FAIL), ("64004", ArgAction.FAIL),
     ("60011", ArgAction.RECONNECT), ("64007", ArgAction.RETRY), ("60014", ArgAction.RETRY),
     ("99999", ArgAction.FAIL)],
)
def test_subscribe_error_policy(code: str, action: ArgAction) -> None:
    assert arg_action(code) is action


# ------------------------------------------------------------------------------------------ login


def test_login_request_is_signed_with_a_fresh_okx_timestamp_and_ack_completes_it() -> None:
    creds = _creds()
    proto = LinkProtocol(60_000)
    req = proto.login(creds, server_ms=1_704_876_947_123)
    body = orjson.loads(req.payload)
    arg = body["args"][0]
    assert body["op"] == "login" and body["id"] == req.id
    assert arg["timestamp"] == "1704876947"
    assert arg["sign"] == signing.ws_login_sign(creds.secret.reveal(), "1704876947")
    assert proto.receive(_event({"id": req.id, "event": "login", "code": "0", "msg": "", "connId": "a4d3ae55"})) \
        == [LoggedIn("a4d3ae55")]
    assert proto.conn_id == "a4d3ae55"


@pytest.mark.parametrize("with_id", [True, False])
@pytest.mark.parametrize(("code", "action"), [("60006", LoginAction.RESYNC_CLOCK), ("60024", LoginAction.FATAL),
                                              ("60009", LoginAction.RETRY)])
def test_login_error_frames_map_to_their_action(code: str, action: LoginAction, with_id: bool) -> None:
    proto = LinkProtocol(60_000)
    req = proto.login(_creds(), server_ms=0)
    frame: dict[str, object] = {"event": "error", "code": code, "msg": "x", "connId": "c"}
    if with_id:
        frame["id"] = req.id
    assert proto.receive(_event(frame)) == [LoginRefused(code, "x", action)]


def test_a_login_answer_nobody_asked_for_is_unexpected_not_a_crash() -> None:
    out = LinkProtocol(60_000).receive(_event({"event": "login", "code": "0"}))
    assert isinstance(out[0], Unexpected)


# ------------------------------------------------------------------------------------------ subscribe

A = SubArg("trades", inst_id="BTC-USDT")
B = SubArg("trades", inst_id="NOPE-USDT")
C = SubArg("books", inst_id="ETH-USDT")


def _ack(req: Request | None, arg: SubArg, op: str = "subscribe") -> OkxEvent:
    frame: dict[str, object] = {"event": op, "arg": arg.to_okx(), "connId": "c1"}
    if req is not None:
        frame["id"] = req.id
    return _event(frame)


def test_acks_mark_args_held_and_a_repeated_ack_is_ignored() -> None:
    proto = LinkProtocol(60_000)
    [req] = proto.subscribe([A, C])
    assert orjson.loads(req.payload)["args"] == [A.to_okx(), C.to_okx()]
    assert proto.receive(_ack(req, A)) == [Subscribed(A, "c1")]
    assert proto.receive(_ack(None, C)) == [Subscribed(C, "c1")]
    assert proto.receive(_ack(req, A)) == []
    assert proto.held == {A, C} and proto.in_flight() == set()
    assert proto.subscribe([A, C]) == []


def test_an_error_naming_one_arg_refuses_only_that_arg() -> None:
    proto = LinkProtocol(60_000)
    [req] = proto.subscribe([A, B, C])
    msg = "Wrong URL or channel:trades,instId:NOPE-USDT doesn't exist. Please use the correct URL"
    out = proto.receive(_event({"id": req.id, "event": "error", "code": "60018", "msg": msg}))
    assert out == [ArgRefused(B, "60018", msg, ArgAction.FAIL)]
    assert proto.in_flight() == {A, C}


def test_an_error_on_a_single_arg_request_refuses_that_arg() -> None:
    proto = LinkProtocol(60_000)
    [req] = proto.subscribe([SubArg("books-l2-tbt", inst_id="BTC-USDT")])
    out = proto.receive(_event({"id": req.id, "event": "error", "code": "64003", "msg": "fee tier"}))
    assert out == [ArgRefused(SubArg("books-l2-tbt", inst_id="BTC-USDT"), "64003", "fee tier", ArgAction.FAIL)]


def test_please_log_in_asks_for_a_reconnect_for_every_arg_in_doubt() -> None:
    proto = LinkProtocol(60_000)
    proto.subscribe([A, C])
    out = proto.receive(_event({"event": "error", "code": "60011", "msg": "Please log in"}))
    assert {(o.arg, o.action) for o in out if isinstance(o, ArgRefused)} == {(A, ArgAction.RECONNECT),
                                                                              (C, ArgAction.RECONNECT)}


def test_a_late_ack_after_a_split_still_counts_once() -> None:
    proto = LinkProtocol(60_000)
    [req] = proto.subscribe([A, B, C])
    out = proto.receive(_event({"id": req.id, "event": "error", "code": "60012", "msg": "Invalid request"}))
    resends = [o for o in out if isinstance(o, Resend)]
    assert len(resends) == 2 and {a for r in resends for a in r.request.args} == {A, B, C}
    assert proto.receive(_ack(req, A)) == [Subscribed(A, "c1")]
    owner = next(r.request for r in resends if A in r.request.args)
    assert proto.receive(_ack(owner, A)) == []


def test_unsubscribe_acks_and_refusals_both_release_the_arg() -> None:
    proto = LinkProtocol(60_000)
    [s] = proto.subscribe([A, C])
    proto.receive(_ack(s, A))
    proto.receive(_ack(s, C))
    [u] = proto.unsubscribe([A, C])
    assert proto.receive(_ack(u, A, "unsubscribe")) == [Unsubscribed(A)]
    assert proto.receive(_event({"id": u.id, "event": "error", "code": "60018", "msg": "x"})) == [Unsubscribed(C)]
    assert proto.held == set()


def test_notice_and_connection_count_events_are_reported() -> None:
    proto = LinkProtocol(60_000)
    assert proto.receive(_event({"event": "notice", "code": "64008", "msg": "upgrade", "connId": "x"})) == [
        Notice("64008", "upgrade")]
    assert proto.receive(_event({"event": "channel-conn-count-error", "channel": "orders", "connCount": "30"})) == [
        ConnCount("orders", "30", exceeded=True)]


@dataclass
class _Server:
    """A model of OKX answering a subscribe: acks for the good args, one unattributed error if any is bad."""

    bad: frozenset[SubArg]
    acks_before_error: bool
    requests: int = 0

    def answer(self, req: Request) -> list[OkxEvent]:
        self.requests += 1
        good = [a for a in req.args if a not in self.bad]
        acks = [_ack(req, a) for a in good]
        if len(good) == len(req.args):
            return acks
        err = _event({"id": req.id, "event": "error", "code": "60018", "msg": "Wrong URL or channel"})
        return [*acks, err] if self.acks_before_error else [err]


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 120).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=4))),
    st.booleans(),
)
def test_unattributed_errors_narrow_to_the_bad_args_without_a_retry_storm(
    sizes: tuple[int, set[int]], acks_before_error: bool
) -> None:
    n, bad_idx = sizes
    args = [SubArg("trades", inst_id=f"C{i}-USDT") for i in range(n)]
    server = _Server(frozenset(args[i] for i in bad_idx), acks_before_error)
    proto = LinkProtocol(60_000)
    queue = list(proto.subscribe(args))
    subscribed: list[SubArg] = []
    refused: list[SubArg] = []
    while queue:
        for ev in server.answer(queue.pop(0)):
            for out in proto.receive(ev):
                if isinstance(out, Subscribed):
                    subscribed.append(out.arg)
                elif isinstance(out, ArgRefused):
                    refused.append(out.arg)
                elif isinstance(out, Resend):
                    queue.append(out.request)
    assert sorted(subscribed) == sorted(set(args) - server.bad)
    assert sorted(refused) == sorted(server.bad)
    assert proto.in_flight() == set()
    # Each bad arg costs at most two requests per halving level (plus the first request).
    levels = max(1, n.bit_length())
    assert server.requests <= 1 + 2 * len(bad_idx) * levels


# ------------------------------------------------------------------------------------------ 64008 overlap


@dataclass(frozen=True)
class _Item:
    side: str
    data: bytes


def _push(key: str, n: int) -> bytes:
    return b'{"arg":{"channel":"trades","instId":"%s"},"data":[{"tradeId":"%d"}]}' % (key.encode(), n)


def _snapshot(key: str) -> bytes:
    return b'{"arg":{"channel":"books","instId":"%s"},"action":"snapshot","data":[]}' % key.encode()


@dataclass(frozen=True)
class _Overlap:
    """One 64008 overlap, from the moment the replacement's socket opened: the server's pushes in time order,
    the replacement subscribed at index `t`, the old connection closed after index `c` (its pushes from
    `lost_from` on lost in flight when it died abnormally). The old connection delivers pushes from before
    `t` late, even after the replacement's ack."""

    arrivals: list[tuple[str, bytes]]
    mark_at: int
    seq: list[bytes]
    lost: frozenset[bytes]


@st.composite
def _overlaps(draw: st.DrawFn, abnormal: bool = False) -> _Overlap:
    keys = draw(st.lists(st.sampled_from(["BTC-USDT", "ETH-USDT", "SOL-USDT"]), min_size=1, max_size=3, unique=True))
    counters = dict.fromkeys(keys, 0)
    seq: list[bytes] = []
    for key in draw(st.lists(st.sampled_from(keys), max_size=30)):
        counters[key] += 1
        seq.append(_push(key, counters[key]))
    t = draw(st.integers(0, len(seq)))
    c = draw(st.integers(t, len(seq)))
    lost_from = draw(st.integers(0, c)) if abnormal else c
    old = seq[:lost_from]
    snaps = [_snapshot(k) for k in draw(st.sets(st.sampled_from(keys)))]
    new = snaps + seq[t:]
    order = draw(st.lists(st.booleans(), min_size=len(old) + len(new), max_size=len(old) + len(new)))
    arrivals: list[tuple[str, bytes]] = []
    oi = ni = 0
    for pick_old in order:
        if (pick_old and oi < len(old)) or ni >= len(new):
            arrivals.append(("old", old[oi]))
            oi += 1
        else:
            arrivals.append(("new", new[ni]))
            ni += 1
    first_new = next((i for i, (side, _) in enumerate(arrivals) if side == "new"), len(arrivals))
    last_old = max((i + 1 for i, (side, _) in enumerate(arrivals) if side == "old"), default=0)
    # The replacement's acks arrive before its first push, and the old connection is closed only after them.
    mark_at = draw(st.integers(0, min(first_new, last_old) if last_old else first_new))
    return _Overlap(arrivals, mark_at, seq, frozenset(seq[lost_from:t]))


def _play(case: _Overlap) -> tuple[list[object], set[bytes], bool]:
    """Feed the aligner like the connection layer does and return the queue a pipeline would see.

    The old connection is drained first; CUTOVER goes in at the first moment after its last frame when
    the aligner is ready, or at the end (forced, as after the catch-up timeout).
    """
    aligner: OverlapAligner[_Item] = OverlapAligner()
    queue: list[object] = []
    last_old = max((i for i, (side, _) in enumerate(case.arrivals) if side == "old"), default=-1)
    aligned: set[bytes] = set()
    cut = False

    def try_cutover(force: bool) -> None:
        nonlocal cut, aligned
        if cut or not (force or aligner.ready()):
            return
        held, aligned = aligner.finish()
        queue.append("CUTOVER")
        queue.extend(held)
        cut = True

    for i, (side, data) in enumerate(case.arrivals):
        if i == case.mark_at:
            aligner.mark_subscribed()
        if i > last_old:
            try_cutover(force=False)
        key = push_arg_key(data)
        assert key is not None
        if side == "old":
            queue.append(_Item("old", data))
            queue.extend(aligner.old_frame(key, data))
        elif cut:
            queue.append(_Item("new", data))
        else:
            queue.extend(aligner.new_frame(key, data, _Item("new", data)))
    aligner.mark_subscribed()
    try_cutover(force=False)
    forced = not cut
    try_cutover(force=True)
    return queue, aligned, forced


def _owner_only(queue: list[object]) -> list[bytes]:
    owner = "old"
    kept = []
    for item in queue:
        if item == "CUTOVER":
            owner = "new"
        elif isinstance(item, _Item) and item.side == owner and b"snapshot" not in item.data:
            kept.append(item.data)
    return kept


@settings(max_examples=500, deadline=None)
@given(_overlaps())
def test_an_owner_only_consumer_sees_every_push_exactly_once_in_order(case: _Overlap) -> None:
    queue, _, forced = _play(case)
    kept = _owner_only(queue)
    new_frames = [d for side, d in case.arrivals if side == "new"]
    assert sorted(i.data for i in queue if isinstance(i, _Item) and i.side == "new") == sorted(new_frames)
    assert set(kept) == set(case.seq)
    if forced:
        return  # the catch-up timeout: nothing lost, repeats are left to the pipeline's content dedupe
    for key in {push_arg_key(d) for d in case.seq}:
        assert [d for d in kept if push_arg_key(d) == key] == [d for d in case.seq if push_arg_key(d) == key]


@settings(max_examples=500, deadline=None)
@given(_overlaps(abnormal=True))
def test_after_an_abnormal_old_close_only_streams_that_never_lined_up_can_miss_pushes(case: _Overlap) -> None:
    queue, aligned, _ = _play(case)
    kept = _owner_only(queue)
    missing = set(case.seq) - set(kept)
    assert missing <= case.lost
    assert not {push_arg_key(d) for d in missing} & aligned


def test_cutover_waits_for_the_new_connection_to_deliver_what_the_old_one_did() -> None:
    seq = [_push("BTC-USDT", i) for i in range(1, 6)]
    case = _Overlap([("old", seq[0]), ("old", seq[1]), ("old", seq[2]), ("new", seq[1]), ("new", seq[2]),
                     ("new", seq[3]), ("new", seq[4])], 0, seq, frozenset())
    queue, aligned, forced = _play(case)
    assert not forced and queue.index("CUTOVER") == 5
    assert _owner_only(queue) == seq
    assert aligned == {push_arg_key(seq[0])}


def test_cutover_is_ready_only_once_the_new_connection_caught_up() -> None:
    aligner: OverlapAligner[_Item] = OverlapAligner()
    key = b'{"channel":"trades","instId":"BTC-USDT"}'
    aligner.mark_subscribed()
    assert aligner.ready()  # quiet: nothing on the stream since the replacement opened
    aligner.old_frame(key, _push("BTC-USDT", 2))
    assert not aligner.ready()  # the old connection is ahead: trade 2 may still come on the new one
    assert aligner.new_frame(key, _push("BTC-USDT", 2), _Item("new", b"2")) == [_Item("new", b"2")]
    assert aligner.ready()
    assert aligner.new_frame(key, _push("BTC-USDT", 3), _Item("new", b"3")) == []
    held, aligned = aligner.finish()
    assert held == [_Item("new", b"3")] and aligned == {key}


def test_a_book_snapshot_is_held_until_an_update_lines_the_streams_up() -> None:
    aligner: OverlapAligner[_Item] = OverlapAligner()
    key = b'{"channel":"books","instId":"BTC-USDT"}'
    aligner.mark_subscribed()
    snap = _Item("new", b"snap")
    assert aligner.new_frame(key, b"snapshot", snap) == []
    assert aligner.ready()  # held for after CUTOVER; nothing the old connection delivered is due
    assert aligner.old_frame(key, b"u1") == []
    assert not aligner.ready()  # u1 came on the old connection only: cutting now would repeat it
    u1 = _Item("new", b"u1")
    assert aligner.new_frame(key, b"u1", u1) == [snap, u1]
    assert aligner.ready()


def test_an_ack_after_the_client_gave_up_waiting_still_counts() -> None:
    proto = LinkProtocol(60_000)
    [req] = proto.subscribe([A, C])
    assert proto.abandon() == {A, C}
    assert proto.receive(_ack(req, A)) == [Subscribed(A, "c1")]
    assert proto.held == {A}


_HANDOVER_ARGS = [SubArg("trades", inst_id=f"H{n}-USDT") for n in range(5)]
_arg_sets = st.frozensets(st.sampled_from(_HANDOVER_ARGS))


@settings(max_examples=300, deadline=None)
@given(_arg_sets, _arg_sets, _arg_sets, st.none() | _arg_sets, st.booleans())
def test_at_cutover_every_old_stream_is_either_proven_handed_over_or_reported_disconnected(
        old: frozenset[SubArg], new: frozenset[SubArg], aligned: frozenset[SubArg],
        held_at_close: frozenset[SubArg] | None, closed_by_us: bool) -> None:
    proven, gone = handover_args(old, new, aligned, held_at_close, closed_by_us)
    assert proven | gone == old and not proven & gone  # each SUBSCRIBED balanced exactly once
    if held_at_close is not None and closed_by_us:
        # We closed gracefully: a stream the replacement held by then is continuous even if never seen on both.
        assert proven == old & (held_at_close | aligned)
    else:
        # OKX closed first (or the socket died): only a stream seen on both sockets is proven.
        assert proven <= new & aligned


@pytest.mark.parametrize(("code", "counts"), [("60005", True), ("60024", True), ("60009", True), (None, True),
                                              ("60023", False), ("60031", False), ("63999", False)])
def test_only_refusals_that_may_be_about_the_key_count_toward_pausing_signed_traffic(code: str | None,
                                                                                      counts: bool) -> None:
    assert counts_against_key(code) is counts
