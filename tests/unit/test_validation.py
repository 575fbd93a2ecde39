"""Pure validation of ids, addresses, labels and capacity."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluemarble.core import validation
from bluemarble.core.errors import InvalidArgument


class TestNodeId:
    @pytest.mark.parametrize("value", ["n1", "node-1.eu_west", "x" * 128, "é" * 64, "节点"])
    def test_accepts(self, value: str) -> None:
        assert validation.node_id(value) == value

    @pytest.mark.parametrize(
        ("value", "text"),
        [("", "empty"), ("x" * 129, "129 bytes"), ("é" * 65, "130 bytes"), ("a/b", "'/'"),
         ("a b", "' '"), ("a\tb", "contains"), ("a\\b", "contains")],
    )
    def test_refuses(self, value: str, text: str) -> None:
        with pytest.raises(InvalidArgument, match="node_id") as info:
            validation.node_id(value)
        assert text in str(info.value)

    def test_a_huge_bad_id_gives_a_short_message(self) -> None:
        with pytest.raises(InvalidArgument) as info:
            validation.node_id("a/" * 60)
        assert len(str(info.value)) < 200

    @given(st.text(min_size=1, max_size=40))
    def test_either_accepts_unchanged_or_raises_invalid_argument(self, value: str) -> None:
        try:
            assert validation.node_id(value) == value
        except InvalidArgument as e:
            assert "node_id" in str(e)


class TestNodeIdCharacters:
    @pytest.mark.parametrize(
        "value", ["\U0001f3ae\U0001f5e1\ufe0f\U0001f47e", ".", "..", "a:b", "a@b", "n\u202e1", "x\x00"]
    )
    def test_refuses_what_its_message_does_not_offer(self, value: str) -> None:
        with pytest.raises(InvalidArgument, match="node_id") as info:
            validation.node_id(value)
        message = str(info.value)
        assert "letters, digits" in message or "contains the characters" in message or (
            "path step" in message and "add a letter or a digit" in message)

    @pytest.mark.parametrize("value", ["a.b", "...", "n-1_2.eu", "ñandú-3"])
    def test_accepts_dots_inside_and_letters_of_any_script(self, value: str) -> None:
        assert validation.node_id(value) == value


# Every id and key a person reads in a log: refuse controls and whitespace-only values.
TEXT_IDS = [
    (validation.player_id, "player_id"),
    (validation.request_id, "request_id"),
    (validation.trade_id, "trade_id"),
    (validation.data_key, "key"),
    (lambda v, f: validation.item_ids(["ok", v], f)[1], "item_ids"),
]
CONTROL_VALUES = ["a\x00b", "\x1b[31mred\x1b[0m", "a\x7f", "a\x85b", "a\x9bc", "\u202eevil", "a\u2066b", "a\nb",
                  "zero\u200bwidth", "\ufeffbom", "no\u00a0break", "a\u2028b"]


class TestControlCharacters:
    @pytest.mark.parametrize(("check", "field"), TEXT_IDS)
    @pytest.mark.parametrize("value", CONTROL_VALUES)
    def test_control_characters_are_refused_without_echoing_them(
        self, check: Callable[[str, str], str], field: str, value: str
    ) -> None:
        with pytest.raises(InvalidArgument, match=field) as info:
            check(value, field)
        message = str(info.value)
        assert "contains the characters" in message
        assert not validation._unsafe_chars(message)  # the message itself is safe to print

    @pytest.mark.parametrize(("check", "field"), TEXT_IDS)
    @pytest.mark.parametrize("value", [" ", "   ", "\u3000", "\u00a0 "])
    def test_whitespace_only_is_refused(self, check: Callable[[str, str], str], field: str, value: str) -> None:
        with pytest.raises(InvalidArgument, match=f"{field}.* (only whitespace|contains the characters)"):
            check(value, field)

    @pytest.mark.parametrize(("check", "field"), TEXT_IDS)
    @pytest.mark.parametrize("value", ["a b", "\u00e9\u4e16\U0001f600"])
    def test_printable_text_is_accepted(self, check: Callable[[str, str], str], field: str, value: str) -> None:
        assert check(value, field) == value

    @pytest.mark.parametrize(("check", "field"), [(c, f) for c, f in TEXT_IDS if f != "key"])
    @pytest.mark.parametrize("value", [" p1", "p1 ", " padded ", "  two"])
    def test_ids_with_whitespace_at_either_end_are_refused(
        self, check: Callable[[str, str], str], field: str, value: str
    ) -> None:
        # Compared exactly, " p1" would be another player than "p1", and no console shows it.
        with pytest.raises(InvalidArgument, match=f"{field}.* begins or ends with whitespace; ids are compared"):
            check(value, field)

    def test_a_data_key_may_keep_its_spaces(self) -> None:
        assert validation.data_key(" padded ") == " padded "


class TestPlayerId:
    def test_any_utf8_up_to_128_bytes(self) -> None:
        assert validation.player_id("a b/c") == "a b/c"
        with pytest.raises(InvalidArgument):
            validation.player_id("")
        with pytest.raises(InvalidArgument):
            validation.player_id("p" * 129)


class TestAddress:
    @pytest.mark.parametrize(
        "value", ["127.0.0.1:7101", "[::1]:7101", "node-1.game.svc.cluster.local:1", "localhost:65535"]
    )
    def test_accepts(self, value: str) -> None:
        assert validation.address(value) == value

    @pytest.mark.parametrize(
        "value",
        ["", "127.0.0.1", ":7101", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "1.2.3.999:1",
         "[::1:1", "[zz::1]:1", "-bad.host:1", "bad_host:1", "a..b:1", "h:port", "x" * 300 + ":1"],
    )
    def test_refuses(self, value: str) -> None:
        with pytest.raises(InvalidArgument, match="address"):
            validation.address(value)

    @pytest.mark.parametrize(
        "value", ["127.0.0.1:٧١٠١", "١٢٧.0.0.1:1", "nœud.game:1", "127.0.0.1:²", "ｘ.game:1"]
    )
    def test_refuses_non_ascii_hosts_and_digits(self, value: str) -> None:
        with pytest.raises(InvalidArgument, match="not ASCII"):
            validation.address(value)

    def test_messages_stay_short_whatever_the_input(self) -> None:
        for value in ("1" * 1_000_000, "h" * 250 + ":1", "[" + ":" * 200 + "]:1", "a" * 200 + ".b:99999"):
            with pytest.raises(InvalidArgument) as info:
                validation.address(value)
            assert len(str(info.value)) < 300, str(info.value)

    @pytest.mark.parametrize(
        ("value", "text"),
        [("0.0.0.0:1", "unspecified"), ("[::]:1", "unspecified"), ("[::ffff:0.0.0.0]:1", "unspecified"),
         ("255.255.255.255:1", "broadcast"), ("239.1.2.3:1", "multicast"), ("[ff05::2]:1", "multicast")],
    )
    def test_reachable_address_refuses_what_reaches_no_node(self, value: str, text: str) -> None:
        assert validation.address(value) == value  # fine to listen on
        with pytest.raises(InvalidArgument, match=text):
            validation.reachable_address(value)

    @pytest.mark.parametrize("value", ["10.0.0.1:7101", "[2001:db8::1]:1", "node-1.game:7101", "localhost:1"])
    def test_reachable_address_accepts_unicast_and_names(self, value: str) -> None:
        assert validation.reachable_address(value) == value

    def test_canonical_address(self) -> None:
        assert validation.canonical_address("Node-1.Game:0080") == "node-1.game:80"
        assert validation.canonical_address("[0:0::1]:7101") == validation.canonical_address("[::1]:7101")
        assert validation.canonical_address("10.0.0.1:1") != validation.canonical_address("10.0.0.1:2")


class TestCapacityAndLabels:
    def test_capacity(self) -> None:
        assert validation.capacity(0) == 1
        assert validation.capacity(5) == 5
        with pytest.raises(InvalidArgument, match="capacity is -1"):
            validation.capacity(-1)
        with pytest.raises(InvalidArgument, match="at most"):
            validation.capacity(10**9)

    def test_labels(self) -> None:
        assert validation.label("", "zone") == ""
        assert validation.label("eu-west-1a", "zone") == "eu-west-1a"
        with pytest.raises(InvalidArgument, match="zone"):
            validation.label("a b", "zone")
        with pytest.raises(InvalidArgument, match="region"):
            validation.label("r" * 65, "region")


class TestNodeFlags:
    def test_an_unspecified_listen_address_needs_advertise(self, capsys: pytest.CaptureFixture[str]) -> None:
        from shardnode.main import parse_args

        base = ["--node-id", "n1", "--listen", "0.0.0.0:7101", "--data-dir", "/nonexistent"]
        assert parse_args([*base, "--advertise", "10.0.0.1:7101"])[0].advertise == "10.0.0.1:7101"
        with pytest.raises(SystemExit):
            parse_args(base)
        assert "unspecified host 0.0.0.0" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parse_args([*base, "--advertise", "0.0.0.0:7101"])

    @pytest.mark.parametrize("value", ["-1", "0.5", "nan", "inf", "2592001"])
    def test_the_reclaim_delay_is_0_or_1_s_to_30_days(self, value: str, capsys: pytest.CaptureFixture[str]) -> None:
        from shardnode.main import parse_args

        base = ["--node-id", "n1", "--data-dir", "/nonexistent"]
        assert parse_args(base)[0].reclaim_after_s == 3600
        assert parse_args([*base, "--reclaim-after-s", "0"])[0].reclaim_after_s == 0
        assert parse_args([*base, "--reclaim-after-s", "2592000"])[0].reclaim_after_s == 2592000
        with pytest.raises(SystemExit):
            parse_args([*base, "--reclaim-after-s", value])
        assert f"--reclaim-after-s is {float(value)}; give 0 (keep copies) or 1 <= seconds" in capsys.readouterr().err


class TestLogCounter:
    def test_accepts_0_to_int63_max(self) -> None:
        assert validation.log_counter(0, "epoch") == 0
        assert validation.log_counter(2**63 - 1, "epoch") == 2**63 - 1

    @pytest.mark.parametrize("value", [2**63, 2**64 - 1, -1])
    def test_refuses_what_no_store_holds_naming_the_field(self, value: int) -> None:
        with pytest.raises(InvalidArgument, match=r"shards\[2\]\.epoch is .*2\^63-1"):
            validation.log_counter(value, "shards[2].epoch")


class TestClientInputs:
    """What a game server may pass by mistake to the client library."""

    def test_a_string_is_not_a_list_of_item_ids(self) -> None:
        with pytest.raises(InvalidArgument, match="item_ids is one string"):
            validation.item_ids("abc")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=r"item_ids\[1\] is a int"):
            validation.item_ids(["a", 5])  # type: ignore[list-item]

    @pytest.mark.parametrize("value", ["5", 5.0, True, None])
    def test_gold_is_a_whole_number(self, value: object) -> None:
        with pytest.raises(InvalidArgument, match="gold is a"):
            validation.gold(value)  # type: ignore[arg-type]

    def test_a_value_is_bytes(self) -> None:
        with pytest.raises(InvalidArgument, match="value is a str; give bytes"):
            validation.data_value("text")  # type: ignore[arg-type]

    @pytest.mark.parametrize("deadline_s", [0, -1, float("nan"), float("inf"), 3601, "5"])
    def test_a_deadline_is_a_number_of_seconds_above_0_and_at_most_an_hour(self, deadline_s: object) -> None:
        from bluemarble.client.routing import check_deadline

        with pytest.raises(InvalidArgument, match="deadline_s is"):
            check_deadline(deadline_s)  # type: ignore[arg-type]
        assert check_deadline(0.5) == 0.5


async def test_a_closed_control_plane_client_says_so() -> None:
    from bluemarble.client.control_plane import ControlPlaneClient
    from bluemarble.core.errors import FailedPrecondition

    client = ControlPlaneClient(["127.0.0.1:9"])
    await client.close()
    await client.close()  # idempotent
    with pytest.raises(FailedPrecondition, match="closed"):
        client.channel()


@pytest.mark.parametrize("value", [42, None, b"player-1", 1.5])
@pytest.mark.parametrize("check", [validation.player_id, validation.trade_id, validation.node_id])
def test_an_id_of_another_type_is_invalid_argument_naming_the_type(
    check: Callable[[str], str], value: object
) -> None:
    with pytest.raises(InvalidArgument, match=f"is a {type(value).__name__}; give a str"):
        check(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("check", [validation.player_id, validation.trade_id, validation.request_id,
                                   validation.data_key, validation.system_name])
def test_text_without_a_utf8_form_is_invalid_argument(check: Callable[[str], str]) -> None:
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        check("p\udcff1")  # what the undecodable byte 0xff of a command line becomes


def test_item_ids_take_any_iterable_once_and_refuse_what_is_not_one() -> None:
    assert validation.item_ids(i for i in ["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="item_ids is a NoneType; give a list"):
        validation.item_ids(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="item_ids is a int"):
        validation.item_ids(5)  # type: ignore[arg-type]
    endless = (f"i{n}" for n in itertools.count())
    with pytest.raises(InvalidArgument, match="lists more than 256 items"):
        validation.item_ids(endless)
    with pytest.raises(InvalidArgument, match="item_ids\\[0\\] is not valid text"):
        validation.item_ids(["\ud800"])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: validation.log_counter("1", "epoch"), "epoch is a str; give a whole number"),  # type: ignore[arg-type]
    (lambda: validation.log_counter(True, "epoch"), "epoch is a bool"),
    (lambda: validation.log_counter(-1, "epoch"), "between 0 and 2\\^63-1"),
    (lambda: validation.flag("no", "allow_stale"), "allow_stale is a str; give True or False"),  # type: ignore[arg-type]
    (lambda: validation.limit(0, 1000), "limit is 0; give 1..1000"),
    (lambda: validation.limit(1.5, 1000), "limit is a float"),  # type: ignore[arg-type]
    (lambda: validation.data_key(5), "key is a int; give a str"),  # type: ignore[arg-type]
    (lambda: validation.system_name(5), "system is a int; give a str"),  # type: ignore[arg-type]
])
def test_options_of_the_wrong_type_or_range_are_invalid_argument(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_made_printable_gives_text_printable_text_accepts_within_its_bytes() -> None:
    """What a node reports from an OS or SQLite error (a path may hold anything): each
    unsafe character becomes '?', and the UTF-8 is cut at a character boundary."""
    from bluemarble.core.validation import made_printable, printable_text

    for raw in ("disk full at /data/\x1b[31mnode\u202e.db\x00", "plain", "ü" * 300, "\u200b\u200b"):
        text = made_printable(raw, 64)
        assert len(text.encode()) <= 64 and printable_text(text, "trouble") == text, (raw, text)
    assert made_printable("disk full at /data/\x1b[31mnode.db", 100) == "disk full at /data/?[31mnode.db"
    assert made_printable("ü" * 300, 7) == "üüü"  # 6 bytes: the fourth would be cut in half
    assert made_printable("\u200b", 10) == "?" and made_printable("   ", 10) == ""  # only spaces: nothing to show
