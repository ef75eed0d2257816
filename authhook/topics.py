"""MQTT topic rules, and the template that places topics in the (tenant, channel, subtopic) namespace.

Everything here is pure and runs on every PUBLISH, so the template is compiled once into level positions
and each call does a single ``str.split``; no regular expressions.

``TopicTemplate.parse_filter`` is the security-relevant piece: the evaluator grants a subscription by the
address it returns, so it over-approximates (a wildcard in the tenant or channel level becomes None,
"any") and never reports less than the filter can really reach.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_TOPIC_BYTES = 65535  # MQTT: a UTF-8 string is length-prefixed by two bytes
MAX_IDENTITY_LENGTH = 256
DEFAULT_TEMPLATE = "m/{tenant}/c/{channel}/{subtopic}"

_SHARE_PREFIX = "$share/"
_QUEUE_PREFIX = "$queue/"  # EMQX's older shared-subscription form, without a group name
_QUEUE_GROUP = "$queue"
_TENANT = "{tenant}"
_CHANNEL = "{channel}"
_SUBTOPIC = "{subtopic}"
_SHOWN_CHARS = 60


class TopicError(ValueError):
    """Invalid topic, filter, shared subscription or identity.

    ``code`` is stable so callers can map it to a deny reason without parsing text; the message is one
    line because it ends up in decision logs.
    """

    code: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _show(value: str) -> str:
    """Quote a client-supplied value for a message: ``repr`` keeps it on one line, the cut keeps it short."""
    if len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + "..."
    return repr(value)


def _check_string(value: str, code: str, what: str) -> None:
    """The checks topic names and filters share: what the MQTT wire format itself forbids."""
    if not value:
        raise TopicError(code, f"{what} is empty")
    if "\x00" in value:
        raise TopicError(code, f"{what} {_show(value)} contains a nul character")
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            # Lone surrogates (e.g. from a JSON "\ud800" escape) have no UTF-8 form, so no broker could
            # ever deliver such a topic; refusing here also keeps encode() from raising further on.
            raise TopicError(code, f"{what} {_show(value)} is not valid unicode") from None
    if size > MAX_TOPIC_BYTES:
        raise TopicError(code, f"{what} is {size} bytes of utf-8, more than {MAX_TOPIC_BYTES}")


def validate_topic_name(topic: str) -> None:
    """Refuse a PUBLISH topic the broker should never have accepted; wildcards would let a publish fan out."""
    _check_string(topic, "invalid_topic", "topic")
    if "+" in topic or "#" in topic:
        raise TopicError("invalid_topic", f"topic {_show(topic)} contains a wildcard, which publish forbids")


def validate_topic_filter(topic_filter: str) -> None:
    """Refuse malformed filters so the matching code may assume wildcards sit on whole levels."""
    _check_string(topic_filter, "invalid_filter", "topic filter")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise TopicError("invalid_filter", f"filter {_show(topic_filter)}: '#' must be the last level")
        if "+" in level and level != "+":
            raise TopicError("invalid_filter", f"filter {_show(topic_filter)}: '+' must be a whole level")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Strip the shared-subscription prefix: the group only load-balances, authorization is on the filter."""
    if topic_filter.startswith(_SHARE_PREFIX):
        group, slash, inner = topic_filter[len(_SHARE_PREFIX) :].partition("/")
        if not slash:
            raise TopicError(
                "invalid_shared_subscription",
                f"shared subscription {_show(topic_filter)} needs the form $share/<group>/<filter>",
            )
        if not group:
            raise TopicError(
                "invalid_shared_subscription", f"shared subscription {_show(topic_filter)} has an empty group"
            )
        if "+" in group or "#" in group:
            raise TopicError("invalid_shared_subscription", f"share group {_show(group)} contains a wildcard")
        if not inner:
            raise TopicError("invalid_shared_subscription", f"{_show(topic_filter)} has an empty filter")
        return group, inner
    if topic_filter.startswith(_QUEUE_PREFIX):
        inner = topic_filter[len(_QUEUE_PREFIX) :]
        if not inner:
            raise TopicError("invalid_shared_subscription", f"{_show(topic_filter)} has an empty filter")
        return _QUEUE_GROUP, inner
    return None, topic_filter


def validate_identity(value: str, what: str) -> None:
    """Usernames and client ids are substituted into topics and ACL patterns (EMQX ``${username}``), so a
    wildcard or level separator in one would widen whatever pattern it is placed into."""
    if not value:
        raise TopicError("invalid_identity", f"{what} is empty")
    if len(value) > MAX_IDENTITY_LENGTH:
        raise TopicError("invalid_identity", f"{what} is longer than {MAX_IDENTITY_LENGTH} characters")
    for forbidden, name in (("\x00", "a nul character"), ("+", "'+'"), ("#", "'#'"), ("/", "'/'")):
        if forbidden in value:
            raise TopicError("invalid_identity", f"{what} {_show(value)} contains {name}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise TopicError("invalid_identity", f"{what} {_show(value)} is not valid unicode") from None


def is_system_topic(topic: str) -> bool:
    """``$`` topics belong to the broker ($SYS) and are outside any tenant's namespace."""
    return topic[:1] == "$"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching, including the rule that a leading wildcard never matches a ``$`` topic."""
    if topic_filter == topic:
        return True  # a validated topic has no wildcards, so equality is a literal match
    plus = "+" in topic_filter
    if not plus and topic_filter[-1:] != "#":
        return False  # a literal filter that is not equal
    if topic[:1] == "$" and topic_filter[0] in "+#":
        return False
    if not plus:
        # Only a trailing '#': a prefix test. "a/b/#" matches "a/b" (the parent) and "a/b/...".
        if len(topic_filter) == 1:
            return True
        return topic.startswith(topic_filter[:-1]) or topic == topic_filter[:-2]
    topic_levels = topic.split("/")
    count = len(topic_levels)
    index = -1
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if index >= count:
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return index + 1 == count


def filter_covers(outer: str, inner: str) -> bool:
    """Is every topic ``inner`` (a validated filter) matches also matched by ``outer``? Grants that name a
    raw filter may only allow subscriptions they fully contain."""
    if outer == inner:
        return True
    if inner[:1] == "$" and outer[0] in "+#":
        return False
    if outer == "+/#":
        return True  # matches every non-'$' topic (the parent rule lets '#' take zero levels), same as '#'
    inner_levels = inner.split("/")
    count = len(inner_levels)
    index = -1
    for index, level in enumerate(outer.split("/")):
        if level == "#":
            return True
        if index >= count:
            return False
        theirs = inner_levels[index]
        if theirs == "#":
            return False  # inner reaches arbitrarily deep, outer does not
        if level != "+" and level != theirs:
            return False  # also covers theirs == "+" against a literal
    return index + 1 == count


def filters_overlap(first: str, second: str) -> bool:
    """Could one topic match both filters? Used so a deny wins over any request it touches.

    Deliberately over-approximate: the ``$``-topic rule is ignored, so a leading wildcard is treated as
    overlapping ``$`` topics too; for a deny that errs on the side of refusing.
    """
    if first == second:
        return True
    a = first.split("/")
    b = second.split("/")
    for left, right in zip(a, b, strict=False):
        if left == "#" or right == "#":
            return True
        if left != right and left != "+" and right != "+":
            return False
    if len(a) == len(b):
        return True
    longer = a if len(a) > len(b) else b
    # The shorter one ended: only a '#' right after it (matching the parent level) can still meet it.
    return longer[min(len(a), len(b))] == "#"


class ChannelAddress(NamedTuple):
    """Where a topic or filter points in the channel namespace."""

    tenant: str | None  # None: the tenant level is a wildcard and could match any tenant
    channel: str | None  # None: the channel level is a wildcard and could match any channel
    subtopic: str  # the levels after the channel, '' if none; may hold wildcards for filters


class TopicTemplate:
    """Maps topics to (tenant, channel, subtopic).

    Template syntax: levels separated by '/', each a literal, ``{tenant}``, ``{channel}`` or (last level
    only, optional) ``{subtopic}``. ``{tenant}`` and ``{channel}`` must each appear exactly once.
    Positions are compiled here once so parsing a topic is one split plus a few index comparisons.
    """

    __slots__ = ("_channel_at", "_fixed", "_literals", "_tenant_at", "_width", "has_subtopic", "template")

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        levels = template.split("/")
        has_subtopic = levels[-1] == _SUBTOPIC
        fixed = levels[:-1] if has_subtopic else levels
        for index, level in enumerate(fixed):
            if level in (_TENANT, _CHANNEL):
                continue
            if level == _SUBTOPIC:
                raise ValueError(f"topic template {template!r}: {_SUBTOPIC} may only be the last level")
            if "{" in level or "}" in level:
                raise ValueError(f"topic template {template!r}: unknown or partial placeholder {level!r}")
            if not level:
                raise ValueError(f"topic template {template!r} has an empty level")
            if "+" in level or "#" in level or "\x00" in level:
                raise ValueError(f"topic template {template!r}: literal {level!r} is not a plain topic level")
            if index == 0 and level.startswith("$"):
                # '$' topics are broker topics: they are never parsed as channel topics.
                raise ValueError(f"topic template {template!r} may not start with a '$' level")
        if fixed.count(_TENANT) != 1 or fixed.count(_CHANNEL) != 1:
            raise ValueError(f"topic template {template!r} must contain {_TENANT} and {_CHANNEL} once each")
        self.template = template
        self.has_subtopic = has_subtopic
        self._fixed: tuple[str, ...] = tuple(fixed)
        self._width = len(fixed)
        self._tenant_at = fixed.index(_TENANT)
        self._channel_at = fixed.index(_CHANNEL)
        self._literals: tuple[tuple[int, str], ...] = tuple(
            (i, level) for i, level in enumerate(fixed) if level not in (_TENANT, _CHANNEL)
        )

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"

    def parse_topic(self, topic: str) -> ChannelAddress | None:
        """The channel a (validated) PUBLISH topic addresses; None means "not a channel topic"."""
        levels = topic.split("/")
        count = len(levels)
        width = self._width
        if count != width and (count < width or not self.has_subtopic):
            return None
        for index, literal in self._literals:
            if levels[index] != literal:
                return None
        tenant = levels[self._tenant_at]
        channel = levels[self._channel_at]
        if not tenant or not channel:
            return None
        return ChannelAddress(tenant, channel, "/".join(levels[width:]) if count > width else "")

    def parse_filter(self, topic_filter: str) -> ChannelAddress | None:
        """Which channel topics a (validated, ``$share``-stripped) filter could match; None if none.

        Never narrower than the truth: an address level left unbound by a wildcard is None ("any").
        """
        levels = topic_filter.split("/")
        count = len(levels)
        tenant: str | None = None
        channel: str | None = None
        tenant_at = self._tenant_at
        channel_at = self._channel_at
        for index, pattern in enumerate(self._fixed):
            if index >= count:
                return None  # without '#', a filter only matches topics with exactly its level count
            level = levels[index]
            if level == "#":
                # Matches this level and everything below; an address level not bound yet stays None.
                return ChannelAddress(tenant, channel, "#")
            if index == tenant_at:
                if not level:
                    return None
                tenant = None if level == "+" else level
            elif index == channel_at:
                if not level:
                    return None
                channel = None if level == "+" else level
            elif level != pattern:
                # A literal level of the template matches only itself: `+` there would reach topics outside
                # the channel namespace (`m/acme/+/telemetry/#` matches `m/acme/x/telemetry/...`). A `#` was
                # handled above: it is how a tenant-wide subscriber says "all of my tenant" (`m/acme/#`).
                return None
        width = self._width
        if count == width:
            return ChannelAddress(tenant, channel, "")
        rest = levels[width:]
        if not self.has_subtopic and rest != ["#"]:
            # Extra levels cannot match; a lone trailing '#' still matches the channel topic itself.
            return None
        return ChannelAddress(tenant, channel, "/".join(rest))

    def topic_for(self, tenant: str, channel: str, subtopic: str = "") -> str:
        """The topic of a channel (and subtopic): the inverse of ``parse_topic``."""
        for what, value in (("tenant", tenant), ("channel", channel)):
            if not value or "/" in value:
                raise ValueError(f"{what} {value!r} must be one non-empty topic level")
        levels = [tenant if p == _TENANT else channel if p == _CHANNEL else p for p in self._fixed]
        if subtopic:
            if not self.has_subtopic:
                raise ValueError(f"topic template {self.template!r} has no {_SUBTOPIC} level")
            levels.append(subtopic)
        return "/".join(levels)
