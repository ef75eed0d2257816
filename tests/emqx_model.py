"""EMQX 5.x's authorization matching, modelled independently of authhook: what a pushed ACL decides.

Used by ``test_emqx_acl_replay`` (the replay property) and ``bench/emqx_acl_calls.py`` (the fake EMQX),
so both hold authhook's ACL to one reading of ``emqx_topic:match/2`` and ``emqx_authz_rule``. Nothing here
imports authhook: it is the oracle.
"""

from __future__ import annotations

from typing import Any


def emqx_valid_filter(topic_filter: str) -> bool:
    """``emqx_topic:validate(filter, _)`` on the words: '#' only as the last word, '+'/'#' only as whole
    words, no NUL; empty words are fine."""
    if not topic_filter:
        return False
    words = topic_filter.split("/")
    for index, word in enumerate(words):
        if word == "#":
            if index != len(words) - 1:
                return False
        elif word != "+" and ("+" in word or "#" in word or "\x00" in word):
            return False
    return True


def emqx_real_filter(raw: str) -> str | None:
    """What EMQX authorizes for a SUBSCRIBE to ``raw``; None when it refuses the filter before asking."""
    if raw.startswith("$share/"):
        group, slash, real = raw[len("$share/") :].partition("/")
        if not slash or not group or not real or "+" in group or "#" in group:
            return None
        if real.startswith(("$share/", "$queue/")) or not emqx_valid_filter(real):
            return None
        return real
    if not emqx_valid_filter(raw):
        return None
    for prefix in ("$queue/", "$exclusive/"):
        if raw.startswith(prefix):
            real = raw[len(prefix) :]
            if not real or real.startswith(("$share/", "$queue/")):
                return None
            return real
    return raw


def emqx_real_name(raw: str) -> str | None:
    """What EMQX authorizes for a PUBLISH to ``raw``; None when it refuses the topic name first."""
    if not raw or "+" in raw or "#" in raw or "\x00" in raw:
        return None
    if raw.startswith("$delayed/"):
        _, slash, real = raw[len("$delayed/") :].partition("/")
        return real if slash and real else None
    return raw


def emqx_words_match(name: list[str], rule: list[str]) -> bool:
    """``emqx_topic:match_tokens``: equal words, or a rule '+' on any one word, or a final rule '#' on the
    rest (nothing included). A '+' or '#' in the request is an ordinary word here."""
    if not name and not rule:
        return True
    if name and rule and (name[0] == rule[0] or rule[0] == "+"):
        return emqx_words_match(name[1:], rule[1:])
    return rule == ["#"]


def emqx_topic_matches(topic: str, rule_topic: str, username: str, clientid: str) -> bool:
    if rule_topic.startswith("eq "):
        return topic == rule_topic[3:]
    rule_topic = rule_topic.replace("${username}", username).replace("${clientid}", clientid)
    name, rule = topic.split("/"), rule_topic.split("/")
    if name[0].startswith("$") and rule[0] in ("+", "#"):
        return False
    return emqx_words_match(name, rule)


def emqx_first_match(rules: list[dict[str, Any]], action: str, topic: str, username: str) -> bool | None:
    """The first rule whose action and topic match decides (True: allow); None: no rule matched."""
    for rule in rules:
        assert rule["permission"] in ("allow", "deny") and rule["action"] in ("publish", "subscribe", "all")
        if rule["action"] not in (action, "all"):
            continue
        topics = rule["topics"] if "topics" in rule else [rule["topic"]]
        if any(emqx_topic_matches(topic, t, username, username) for t in topics):
            return bool(rule["permission"] == "allow")
    return None
