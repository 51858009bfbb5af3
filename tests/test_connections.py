"""The connection table: admission by address, sessions per user and address."""

from __future__ import annotations

from dataclasses import dataclass

from pop3d.connections import ConnectionTable, Verdict


@dataclass
class Fake:
    address: str
    user: str = ""
    logged_in: bool = False
    logging_in: bool = False
    closing: bool = False


def test_logged_in_sessions_leave_the_waiting_count_and_join_their_user() -> None:
    table: ConnectionTable[Fake] = ConnectionTable()
    sessions = {f"c{n}": Fake("127.0.0.1") for n in range(5)}
    for conn_id, session in sessions.items():
        table.add(conn_id, session)
    assert table.waiting_from("127.0.0.1") == 5
    for conn_id in ("c0", "c1"):
        sessions[conn_id].user, sessions[conn_id].logged_in = "alice", True
        table.logged_in(conn_id)
    assert table.waiting_from("127.0.0.1") == 3
    assert table.sessions_of("alice", "127.0.0.1") == 2
    assert table.sessions_of("bob", "127.0.0.1") == 0
    assert table.sessions_of("alice", "10.0.0.1") == 0
    # The limit per address counts only those still waiting: 1,000 logged in do not block a newcomer.
    assert table.admit("127.0.0.1", max_connections=100, max_per_address=4).verdict is Verdict.ADMIT
    assert table.admit("127.0.0.1", max_connections=100, max_per_address=3).verdict is Verdict.REFUSE_ADDRESS
    sessions["c2"].closing = True  # told to close: no longer counts
    assert table.waiting_from("127.0.0.1") == 2
    for conn_id in sessions:
        table.remove(conn_id)
    assert len(table) == 0
    assert table.waiting_from("127.0.0.1") == 0
    assert table.sessions_of("alice", "127.0.0.1") == 0
    assert not table._waiting and not table._users  # nothing left behind


def test_ipv6_neighbours_share_a_count() -> None:
    table: ConnectionTable[Fake] = ConnectionTable()
    table.add("a", Fake("2001:db8::1"))
    table.add("b", Fake("2001:db8::2"))
    assert table.waiting_from("2001:db8::3") == 2
    assert table.waiting_from("2001:db8:0:1::1") == 0
