"""Topic rules and the channel template: tables for the edges, properties against an independent matcher.

The property that matters most for security is ``test_parse_filter_never_narrower_than_matching``: every
channel topic a filter can really match must be inside the address ``parse_filter`` reports.
"""

from __future__ import annotations

from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authhook.topics import (
    DEFAULT_TEMPLATE,
    MAX_IDENTITY_LENGTH,
    MAX_TOPIC_BYTES,
    ChannelAddress,
    TopicError,
    TopicTemplate,
    filter_covers,
    filters_overlap,
    is_system_topic,
    split_shared,
    topic_matches,
    validate_identity,
    validate_topic_filter,
    validate_topic_name,
)

# --- reference matcher, written level by level straight from the MQTT text --------------------------------


def reference_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7: '+' one level, '#' the rest including the parent, no leading wildcard on '$'."""

    def match(filters: list[str], topics: list[str], first: bool) -> bool:
        if not filters:
            return not topics
        head, rest = filters[0], filters[1:]
        if first and head in ("+", "#") and topics and topics[0].startswith("$"):
            return False
        if head == "#":
            return True
        if not topics:
            return False
        if head == "+" or head == topics[0]:
            return match(rest, topics[1:], False)
        return False

    return match(topic_filter.split("/"), topic.split("/"), True)


# --- validation tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "a",
        "a/b",
        "a//b",
        "/a",
        "a/",
        "/",
        "//",
        "$SYS/broker/load",
        "ü/✓/日本",
        "x" * MAX_TOPIC_BYTES,
        "é" * (MAX_TOPIC_BYTES // 2),  # 65534 bytes
        "€" * (MAX_TOPIC_BYTES // 3),  # 65535 bytes exactly
    ],
)
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "+",
        "#",
        "a/+",
        "a/#",
        "a+b",
        "a#",
        "a/b+/c",
        "a\x00b",
        "\x00",
        "x" * (MAX_TOPIC_BYTES + 1),
        "é" * (MAX_TOPIC_BYTES // 2 + 1),  # only 32768 characters, but 65536 bytes
        "€" * (MAX_TOPIC_BYTES // 3) + "a",  # 65536 bytes
        "a/\ud800",  # a lone surrogate has no UTF-8 encoding
    ],
)
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(TopicError) as caught:
        validate_topic_name(topic)
    assert caught.value.code == "invalid_topic"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a",
        "a/+",
        "a/#",
        "+/+/#",
        "+/a/+",
        "a//b",
        "/#",
        "/+",
        "+/",
        "//#",
        "$SYS/#",
        "$share",  # not a shared subscription, just a '$' filter
        "x" * MAX_TOPIC_BYTES,
        "é" * (MAX_TOPIC_BYTES // 2),
    ],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "a#",
        "#a",
        "a/#/b",
        "#/a",
        "#/#",
        "##",
        "a+",
        "+a/b",
        "a/b+",
        "a/++/b",
        "+#",
        "a\x00",
        "x" * (MAX_TOPIC_BYTES + 1),
        "é" * (MAX_TOPIC_BYTES // 2 + 1),
        "\udfff/#",
    ],
)
def test_invalid_topic_filters(topic_filter: str) -> None:
    with pytest.raises(TopicError) as caught:
        validate_topic_filter(topic_filter)
    assert caught.value.code == "invalid_filter"


@pytest.mark.parametrize(
    ("call", "value"),
    [
        (validate_topic_name, "a\n+"),
        (validate_topic_filter, "a\r\n#/b"),
        (validate_topic_filter, "\n" * 70 + "+x"),
        (lambda value: validate_identity(value, "username"), "line\nbreak/"),
    ],
)
def test_error_messages_are_one_line(call: object, value: str) -> None:
    assert callable(call)
    with pytest.raises(TopicError) as caught:
        call(value)
    message = str(caught.value)
    assert message
    assert "\n" not in message and "\r" not in message
    assert len(message) < 200


# --- shared subscriptions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_filter", "expected"),
    [
        ("$share/g/a/b", ("g", "a/b")),
        ("$share/group-1/#", ("group-1", "#")),
        ("$share/g/+/x", ("g", "+/x")),
        ("$share/g//", ("g", "/")),
        ("$share/g/$SYS/#", ("g", "$SYS/#")),
        ("$queue/a/b", ("$queue", "a/b")),
        ("$queue/#", ("$queue", "#")),
        ("a/b", (None, "a/b")),
        ("#", (None, "#")),
        ("$SYS/#", (None, "$SYS/#")),
        ("$sharex/g/a", (None, "$sharex/g/a")),
        ("$share", (None, "$share")),
        ("x/$share/g/a", (None, "x/$share/g/a")),
    ],
)
def test_split_shared(given_filter: str, expected: tuple[str | None, str]) -> None:
    assert split_shared(given_filter) == expected


@pytest.mark.parametrize(
    "bad",
    ["$share/", "$share/g", "$share//a", "$share/g/", "$share/g+/a", "$share/+/a", "$share/#/a", "$queue/"],
)
def test_split_shared_rejects(bad: str) -> None:
    with pytest.raises(TopicError) as caught:
        split_shared(bad)
    assert caught.value.code == "invalid_shared_subscription"


# --- identities ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["alice", "a", "a" * MAX_IDENTITY_LENGTH, "ü-ser", "dev.01_x@acme", "$x"])
def test_valid_identities(value: str) -> None:
    validate_identity(value, "username")


@pytest.mark.parametrize(
    "value", ["", "a" * (MAX_IDENTITY_LENGTH + 1), "a/b", "/", "a+b", "+", "a#", "#", "a\x00", "x\ud800"]
)
def test_invalid_identities(value: str) -> None:
    with pytest.raises(TopicError) as caught:
        validate_identity(value, "client id")
    assert caught.value.code == "invalid_identity"
    assert str(caught.value).startswith("client id ")


# --- matching ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a", False),
        ("a/+", "a/", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/#", "ab/c", False),
        ("a/b/#", "a", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("+", "$SYS", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/+/#", "$SYS/a/x", False),
        ("+/$SYS", "a/$SYS", True),
        ("/+", "/a", True),
        ("/#", "/", True),
        ("/#", "a", False),
        ("+/+", "/", True),
        ("+", "/", False),
        ("+/#", "a", True),
        ("a//b", "a//b", True),
        ("a/+/b", "a//b", True),
    ],
)
def test_topic_matches_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected
    assert reference_matches(topic_filter, topic) is expected


def test_is_system_topic() -> None:
    assert is_system_topic("$SYS/x")
    assert is_system_topic("$")
    assert not is_system_topic("a/$SYS")
    assert not is_system_topic("/$SYS")
    assert not is_system_topic("")


# --- strategies ----------------------------------------------------------------------------------------

TOPIC_LEVELS = ("", "$SYS", "a", "b")
FILTER_LEVELS = (*TOPIC_LEVELS, "+")


@st.composite
def topics(draw: st.DrawFn, levels: tuple[str, ...] = TOPIC_LEVELS, max_size: int = 5) -> str:
    topic = "/".join(draw(st.lists(st.sampled_from(levels), min_size=1, max_size=max_size)))
    return topic or draw(st.sampled_from([x for x in levels if x]))


@st.composite
def filters(draw: st.DrawFn, levels: tuple[str, ...] = FILTER_LEVELS, max_size: int = 5) -> str:
    body = draw(st.lists(st.sampled_from(levels), min_size=0, max_size=max_size))
    if not body or draw(st.booleans()):
        body.append("#")
    topic_filter = "/".join(body)
    return topic_filter or "+"


@st.composite
def wildcarded(draw: st.DrawFn, topic: str) -> str:
    """A filter derived from ``topic``, so it usually matches it: some levels '+', maybe cut by '#'."""
    levels = [("+" if draw(st.integers(0, 3)) == 0 else level) for level in topic.split("/")]
    if draw(st.booleans()):
        levels = [*levels[: draw(st.integers(0, len(levels)))], "#"]
    return "/".join(levels) or "+"


@given(filters(), topics())
def test_topic_matches_agrees_with_reference(topic_filter: str, topic: str) -> None:
    validate_topic_filter(topic_filter)
    validate_topic_name(topic)
    assert topic_matches(topic_filter, topic) == reference_matches(topic_filter, topic)


@given(st.data())
def test_topic_matches_agrees_with_reference_on_likely_matches(data: st.DataObject) -> None:
    topic = data.draw(topics())
    topic_filter = data.draw(wildcarded(topic))
    validate_topic_filter(topic_filter)
    assert topic_matches(topic_filter, topic) == reference_matches(topic_filter, topic)


# --- filter containment and overlap (they decide raw-filter grants and denies) --------------------------

SMALL_FILTER_LEVELS = ("", "$SYS", "a", "+")
UNIVERSE_LEVELS = ("", "$SYS", "a", "z")  # 'z' appears in no filter: a level only '+' or '#' can match


def universe(depth: int) -> list[str]:
    return ["/".join(p) for n in range(1, depth + 1) for p in product(UNIVERSE_LEVELS, repeat=n)]


@settings(deadline=None)
@given(filters(SMALL_FILTER_LEVELS, max_size=3), filters(SMALL_FILTER_LEVELS, max_size=3))
def test_filter_covers_is_exact_containment(outer: str, inner: str) -> None:
    depth = max(outer.count("/"), inner.count("/")) + 2
    contained = all(topic_matches(outer, t) for t in universe(depth) if reference_matches(inner, t))
    assert filter_covers(outer, inner) == contained


@settings(deadline=None)
@given(filters(SMALL_FILTER_LEVELS, max_size=3), filters(SMALL_FILTER_LEVELS, max_size=3))
def test_filters_overlap_never_misses_a_shared_topic(first: str, second: str) -> None:
    depth = max(first.count("/"), second.count("/")) + 2
    shared = any(reference_matches(first, t) and reference_matches(second, t) for t in universe(depth))
    if shared:
        assert filters_overlap(first, second)
    if "$" not in first and "$" not in second:
        assert filters_overlap(first, second) == shared  # exact apart from the deliberate '$' slack


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/+/b", True),
        ("a/+", "a/#", False),
        ("a/+/#", "a/#", False),
        ("a/+/#", "a/+", True),
        ("#", "$SYS/#", False),
        ("$SYS/#", "$SYS/+", True),
        ("a/b", "a/+", False),
        ("+/b", "a/b", True),
    ],
)
def test_filter_covers_table(outer: str, inner: str, expected: bool) -> None:
    assert filter_covers(outer, inner) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("a/#", "a", True),
        ("a", "a/#", True),
        ("a", "a/+", False),
        ("a/+", "+/b", True),
        ("a/b", "a/c", False),
        ("a/b/c", "a/#", True),
        ("#", "$SYS/x", True),  # over-approximate on purpose: a deny on '#' also refuses '$' topics
    ],
)
def test_filters_overlap_table(first: str, second: str, expected: bool) -> None:
    assert filters_overlap(first, second) is expected


# --- the template ----------------------------------------------------------------------------------------

DEFAULT = TopicTemplate()
FLIPPED = TopicTemplate("channels/{channel}/tenants/{tenant}")  # no {subtopic}, channel first
BARE = TopicTemplate("{tenant}/{channel}/{subtopic}")
SANDWICH = TopicTemplate("x/{channel}/{tenant}/y")  # a literal after the address, no {subtopic}
TEMPLATES = (
    DEFAULT,
    FLIPPED,
    BARE,
    SANDWICH,
    TopicTemplate("tenants/{tenant}/channels/{channel}/{subtopic}"),
)


def test_default_template() -> None:
    assert DEFAULT_TEMPLATE == "m/{tenant}/c/{channel}/{subtopic}"
    assert DEFAULT.template == DEFAULT_TEMPLATE


def addr(tenant: str | None, channel: str | None, subtopic: str = "") -> ChannelAddress:
    return ChannelAddress(tenant, channel, subtopic)


@pytest.mark.parametrize(
    ("template", "topic", "expected"),
    [
        (DEFAULT, "m/acme/c/temp", addr("acme", "temp")),
        (DEFAULT, "m/acme/c/temp/a/b", addr("acme", "temp", "a/b")),
        (DEFAULT, "m/acme/c/temp/", addr("acme", "temp", "")),
        (DEFAULT, "m/acme/c/temp//x", addr("acme", "temp", "/x")),
        (DEFAULT, "m/acme/c", None),
        (DEFAULT, "m/acme", None),
        (DEFAULT, "m//c/temp", None),
        (DEFAULT, "m/acme/c/", None),
        (DEFAULT, "/m/acme/c/temp", None),
        (DEFAULT, "n/acme/c/temp", None),
        (DEFAULT, "m/acme/d/temp", None),
        (DEFAULT, "M/acme/c/temp", None),
        (DEFAULT, "foo/bar", None),
        (FLIPPED, "channels/temp/tenants/acme", addr("acme", "temp")),
        (FLIPPED, "channels/temp/tenants/acme/more", None),
        (FLIPPED, "channels/temp/tenants", None),
        (FLIPPED, "channels/temp/tenants/", None),
        (FLIPPED, "channels/temp/other/acme", None),
        (BARE, "acme/temp", addr("acme", "temp")),
        (BARE, "acme/temp/x/y", addr("acme", "temp", "x/y")),
        (BARE, "acme", None),
        (BARE, "/temp", None),
        (SANDWICH, "x/temp/acme/y", addr("acme", "temp")),
        (SANDWICH, "x/temp/acme/z", None),
        (SANDWICH, "x/temp/acme/y/z", None),
    ],
)
def test_parse_topic(template: TopicTemplate, topic: str, expected: ChannelAddress | None) -> None:
    validate_topic_name(topic)
    assert template.parse_topic(topic) == expected


@pytest.mark.parametrize(
    ("template", "topic_filter", "expected"),
    [
        (DEFAULT, "m/acme/c/+/temp", addr("acme", None, "temp")),
        (DEFAULT, "m/+/c/x", addr(None, "x")),
        (DEFAULT, "m/acme/#", addr("acme", None, "#")),
        (DEFAULT, "m/acme/c/#", addr("acme", None, "#")),
        (DEFAULT, "m/#", addr(None, None, "#")),
        (DEFAULT, "#", addr(None, None, "#")),
        (DEFAULT, "+/+/+/+/#", None),  # a literal level matches only itself: `+` there leaves the namespace
        (DEFAULT, "m/acme/c/ch/#", addr("acme", "ch", "#")),
        (DEFAULT, "m/acme/c/ch/+/x", addr("acme", "ch", "+/x")),
        (DEFAULT, "m/acme/c/ch", addr("acme", "ch")),
        (DEFAULT, "m/acme/+/ch", None),
        (DEFAULT, "+/acme/c/ch", None),
        (DEFAULT, "foo/bar", None),
        (DEFAULT, "m/acme/d/ch", None),
        (DEFAULT, "m//c/ch", None),
        (DEFAULT, "m/acme/c//#", None),
        (DEFAULT, "m/acme/c", None),
        (DEFAULT, "m/acme/c/+", addr("acme", None)),
        (DEFAULT, "/m/acme/c/ch", None),
        (FLIPPED, "channels/ch/tenants/acme", addr("acme", "ch")),
        (FLIPPED, "channels/ch/#", addr(None, "ch", "#")),  # '#' before {tenant}: any tenant
        (FLIPPED, "channels/+/tenants/acme", addr("acme", None)),
        (FLIPPED, "channels/ch/tenants/acme/#", addr("acme", "ch", "#")),  # '#' matches the parent too
        (FLIPPED, "channels/ch/tenants/acme/x", None),
        (FLIPPED, "channels/ch/tenants/acme/+", None),
        (FLIPPED, "channels/ch/+/+", None),
        (SANDWICH, "x/ch/acme/#", addr("acme", "ch", "#")),
        (SANDWICH, "x/ch/acme/+", None),
        (SANDWICH, "x/ch/acme/y/#", addr("acme", "ch", "#")),
        (SANDWICH, "x/ch/acme/z", None),
        (BARE, "#", addr(None, None, "#")),
        (BARE, "acme/#", addr("acme", None, "#")),
        (BARE, "+/ch/a/#", addr(None, "ch", "a/#")),
    ],
)
def test_parse_filter(template: TopicTemplate, topic_filter: str, expected: ChannelAddress | None) -> None:
    validate_topic_filter(topic_filter)
    assert template.parse_filter(topic_filter) == expected


def test_topic_for() -> None:
    assert DEFAULT.topic_for("acme", "temp") == "m/acme/c/temp"
    assert DEFAULT.topic_for("acme", "temp", "a/b") == "m/acme/c/temp/a/b"
    assert FLIPPED.topic_for("acme", "temp") == "channels/temp/tenants/acme"
    assert SANDWICH.topic_for("acme", "temp") == "x/temp/acme/y"
    with pytest.raises(ValueError, match="subtopic"):
        FLIPPED.topic_for("acme", "temp", "extra")
    for tenant, channel in (("", "temp"), ("acme", ""), ("a/b", "temp"), ("acme", "t/x")):
        with pytest.raises(ValueError):
            DEFAULT.topic_for(tenant, channel)


@pytest.mark.parametrize(
    "template",
    [
        "",
        "m/{tenant}",
        "m/{channel}/{subtopic}",
        "{tenant}/{tenant}/{channel}",
        "{tenant}/{channel}/{channel}",
        "{subtopic}/{tenant}/{channel}",
        "{tenant}/{subtopic}/{channel}",
        "m/{tenant}/{channel}/{subtopic}/x",
        "{tenant}/{channel}/{subtopic}/{subtopic}",
        "m/{x}/{tenant}/{channel}",
        "m/t{tenant}/{channel}",
        "m/{tenant}x/{channel}",
        "m/{tenant/{channel}",
        "m//{tenant}/{channel}",
        "/{tenant}/{channel}",
        "{tenant}/{channel}/",
        "m/+/{tenant}/{channel}",
        "m/#/{tenant}/{channel}",
        "m/a\x00/{tenant}/{channel}",
        "$SYS/{tenant}/{channel}",
    ],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError):
        TopicTemplate(template)


# --- template properties ---------------------------------------------------------------------------------

TEMPLATE_WORDS = ("m", "c", "channels", "tenants", "x", "y")
ADDRESS_WORDS = ("acme", "beta", "$SYS", "")
WORDS = (*TEMPLATE_WORDS, *ADDRESS_WORDS, "a")


@st.composite
def template_topics(draw: st.DrawFn, template: TopicTemplate) -> str:
    """Topics that mostly follow ``template``'s shape, with every level sometimes replaced by anything."""
    levels = []
    for part in template.template.split("/"):
        if part == "{subtopic}":
            levels.extend(draw(st.lists(st.sampled_from(WORDS), max_size=3)))
        elif draw(st.integers(0, 5)) == 0:
            levels.append(draw(st.sampled_from(WORDS)))
        elif part in ("{tenant}", "{channel}"):
            levels.append(draw(st.sampled_from(ADDRESS_WORDS)))
        else:
            levels.append(part)
    if draw(st.integers(0, 5)) == 0:
        levels.extend(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=2)))
    if draw(st.integers(0, 7)) == 0:
        levels = levels[: draw(st.integers(1, len(levels)))]
    return "/".join(levels) or "a"


templates = st.sampled_from(TEMPLATES)


@given(st.data())
def test_parse_filter_never_narrower_than_matching(data: st.DataObject) -> None:
    template = data.draw(templates)
    topic = data.draw(template_topics(template))
    topic_filter = data.draw(
        st.one_of(wildcarded(topic), filters((*WORDS, "+"), max_size=6), template_topics(template))
    )
    validate_topic_name(topic)
    validate_topic_filter(topic_filter)
    address = template.parse_topic(topic)
    if address is None or not topic_matches(topic_filter, topic):
        return
    reach = template.parse_filter(topic_filter)
    if opens_a_literal_level(template, topic_filter):
        # Refused on purpose: such a filter also reaches topics outside the channel namespace.
        assert reach is None, (topic_filter, topic)
        return
    assert reach is not None, (topic_filter, topic)
    assert reach.tenant is None or reach.tenant == address.tenant, (topic_filter, topic)
    assert reach.channel is None or reach.channel == address.channel, (topic_filter, topic)


def opens_a_literal_level(template: TopicTemplate, topic_filter: str) -> bool:
    """Whether the filter has a `+` where the template has a literal level (before any `#`); written from the
    template string, not from the code under test."""
    literal = [not (p.startswith("{") and p.endswith("}")) for p in template.template.split("/")]
    for level, is_literal in zip(topic_filter.split("/"), literal, strict=False):
        if level == "#":
            return False
        if level == "+" and is_literal:
            return True
    return False


@given(st.data())
def test_a_literal_level_of_the_template_is_matched_literally(data: st.DataObject) -> None:
    """`m/acme/+/telemetry/#` and `+/acme/c/telemetry/#` reach topics outside `m/<tenant>/c/...`: no address."""
    template = data.draw(templates)
    topic = data.draw(template_topics(template))
    levels = topic.split("/")
    literal_positions = [
        i for i, p in enumerate(template.template.split("/")) if not p.startswith("{") and i < len(levels)
    ]
    if not literal_positions:
        return
    position = data.draw(st.sampled_from(literal_positions))
    levels[position] = "+"
    topic_filter = "/".join(levels)
    validate_topic_filter(topic_filter)
    assert template.parse_filter(topic_filter) is None, topic_filter


@given(st.data())
def test_parse_filter_of_a_topic_name_is_parse_topic(data: st.DataObject) -> None:
    template = data.draw(templates)
    topic = data.draw(template_topics(template))
    validate_topic_name(topic)
    assert template.parse_filter(topic) == template.parse_topic(topic)


level_chars = st.characters(exclude_characters="/+#\x00", exclude_categories=["Cs"])
level_text = st.text(level_chars, min_size=1, max_size=8)


subtopic_parts = st.lists(st.text(st.sampled_from("ab/é$ "), max_size=4), max_size=3)


@given(templates, level_text, level_text, subtopic_parts)
def test_topic_for_round_trips(template: TopicTemplate, tenant: str, channel: str, parts: list[str]) -> None:
    subtopic = "/".join(parts) if template.has_subtopic else ""
    topic = template.topic_for(tenant, channel, subtopic)
    validate_topic_name(topic)
    assert template.parse_topic(topic) == ChannelAddress(tenant, channel, subtopic)
