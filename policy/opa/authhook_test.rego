# Unit tests for authhook.rego, in OPA's convention: every `test_*` rule must be true.
#
#     opa test policy/opa/           (with an OPA binary)
#     pytest tests/test_opa.py -k rego   (here: the same rules evaluated with regopy)
#
# `decide(doc)` is `mqtt.decision with input as doc`, spelled key by key: rego-cpp 1.5.2 (regopy) crashes
# on `with input as <object>`, and reads a rule given to `with` as undefined, so each top-level key is
# bound to a local and replaced on its own. OPA gives both spellings the same meaning. Every test states
# the exact answer, so an undefined decision fails it.

package authhook.mqtt_test

import data.authhook.mqtt

# -- fixtures ---------------------------------------------------------------------------------------

# `dev-1` of tenant `acme` publishes on channel `telemetry`; it is connected for publish, holds no roles
base := {
	"action": "publish",
	"subject": {"enabled": true, "tenant_enabled": true, "tenant": "acme", "id": "dev-1"},
	"claimed_tenant": null,
	"address": {"tenant": "acme", "channel": "telemetry"},
	"channel_exists": true,
	"blocks": [],
	"connection": ["publish"],
	"channel_groups": [],
	"topic": "m/acme/c/telemetry",
	"system": false,
}

with_keys(changes) := object.union(base, changes)

block(name, effect, actions, scope, ref) := {
	"effect": effect,
	"actions": actions,
	"scope": scope,
	"ref": ref,
	"id": concat("", ["role:r/block:", name]),
}

topic_block(name, effect, actions, ref, grants, overlaps) := object.union(
	block(name, effect, actions, "topic", ref),
	{"grants_topic": grants, "overlaps_topic": overlaps},
)

# a subscription to every channel of acme: m/acme/c/+
wildcard_channel := {
	"action": "subscribe",
	"address": {"tenant": "acme", "channel": null},
	"channel_exists": false,
	"connection": [],
	"topic": "m/acme/c/+",
}

# a subscription to a broker topic outside the channel namespace
system_filter(filter) := {
	"action": "subscribe",
	"address": null,
	"channel_exists": false,
	"connection": [],
	"topic": filter,
	"system": true,
}

decide(doc) := result if {
	action := doc.action
	subject := doc.subject
	claimed_tenant := doc.claimed_tenant
	address := doc.address
	channel_exists := doc.channel_exists
	blocks := doc.blocks
	connection := doc.connection
	channel_groups := doc.channel_groups
	topic := doc.topic
	system := doc.system
	result := mqtt.decision with input.action as action
		with input.subject as subject
		with input.claimed_tenant as claimed_tenant
		with input.address as address
		with input.channel_exists as channel_exists
		with input.blocks as blocks
		with input.connection as connection
		with input.channel_groups as channel_groups
		with input.topic as topic
		with input.system as system
}

# the same document through the step-by-step order alone, without the common-request clause
steps(doc) := result if {
	action := doc.action
	subject := doc.subject
	claimed_tenant := doc.claimed_tenant
	address := doc.address
	channel_exists := doc.channel_exists
	blocks := doc.blocks
	connection := doc.connection
	channel_groups := doc.channel_groups
	topic := doc.topic
	system := doc.system
	result := mqtt.steps with input.action as action
		with input.subject as subject
		with input.claimed_tenant as claimed_tenant
		with input.address as address
		with input.channel_exists as channel_exists
		with input.blocks as blocks
		with input.connection as connection
		with input.channel_groups as channel_groups
		with input.topic as topic
		with input.system as system
}

deny(reason) := {"allowed": false, "reason": reason}

# -- connections ------------------------------------------------------------------------------------

test_connected_allows if {
	decide(base) == {"allowed": true, "reason": "connected"}
}

test_connection_is_per_action if {
	decide(with_keys({"action": "subscribe"})) == deny("not_connected")
}

test_not_connected_denies if {
	decide(with_keys({"connection": []})) == deny("not_connected")
}

test_unknown_channel_denies_even_when_connected if {
	decide(with_keys({"channel_exists": false})) == deny("unknown_channel")
}

# -- permission blocks: deny wins -------------------------------------------------------------------

test_deny_block_wins_over_connection if {
	doc := with_keys({"blocks": [block("quiet", "deny", ["publish"], "channel", "telemetry")]})
	decide(doc) == {"allowed": false, "reason": "denied_by_block", "block": 0}
}

test_deny_block_wins_over_allow_and_names_the_first_deny if {
	doc := with_keys({
		"connection": [],
		"blocks": [
			block("all", "allow", ["publish", "subscribe"], "tenant", null),
			block("other", "deny", ["publish"], "channel", "alarms"),
			block("no", "deny", ["publish"], "channel", "telemetry"),
			block("again", "deny", ["publish"], "tenant", null),
		],
	})
	decide(doc) == {"allowed": false, "reason": "denied_by_block", "block": 2}
}

test_block_only_applies_to_its_actions if {
	doc := with_keys({"blocks": [block("sub-only", "deny", ["subscribe"], "channel", "telemetry")]})
	decide(doc) == {"allowed": true, "reason": "connected"}
}

test_channel_scope_covers_only_its_channel if {
	grant := block("ops", "allow", ["publish"], "channel", "telemetry")
	decide(with_keys({"connection": [], "blocks": [grant]})) == {"allowed": true, "reason": "role_grant", "block": 0}
	other := block("ops", "allow", ["publish"], "channel", "alarms")
	decide(with_keys({"connection": [], "blocks": [other]})) == deny("not_connected")
}

test_tenant_scope_covers_every_channel if {
	grant := block("all", "allow", ["publish"], "tenant", null)
	decide(with_keys({"connection": [], "blocks": [grant]})) == {"allowed": true, "reason": "role_grant", "block": 0}
}

# a channel group reaches the channel through input.channel_groups (its groups, transitively)
test_group_scope_coverage if {
	grant := block("floor", "allow", ["publish"], "channel_group", "plant-floor")
	in_group := with_keys({"connection": [], "blocks": [grant], "channel_groups": ["plant", "plant-floor"]})
	decide(in_group) == {"allowed": true, "reason": "role_grant", "block": 0}
	outside := with_keys({"connection": [], "blocks": [grant], "channel_groups": ["offices"]})
	decide(outside) == deny("not_connected")
}

test_group_scope_deny_wins_over_connection if {
	doc := with_keys({
		"blocks": [block("floor", "deny", ["publish"], "channel_group", "plant-floor")],
		"channel_groups": ["plant-floor"],
	})
	decide(doc) == {"allowed": false, "reason": "denied_by_block", "block": 0}
}

# -- wildcard channel level: needs a tenant-wide allow, and any deny could apply --------------------

test_tenant_wide_role_allows_wildcard_channel_filter if {
	doc := with_keys(object.union(wildcard_channel, {"blocks": [block("watch", "allow", ["subscribe"], "tenant", null)]}))
	decide(doc) == {"allowed": true, "reason": "role_grant", "block": 0}
}

test_deny_block_defeats_the_wildcard if {
	doc := with_keys(object.union(wildcard_channel, {"blocks": [
		block("watch", "allow", ["subscribe"], "tenant", null),
		block("no-cmd", "deny", ["subscribe"], "channel", "commands"),
	]}))
	decide(doc) == {"allowed": false, "reason": "denied_by_block", "block": 1}
}

test_channel_grant_is_not_enough_for_a_wildcard if {
	doc := with_keys(object.union(wildcard_channel, {"blocks": [block("one", "allow", ["subscribe"], "channel", "telemetry")]}))
	decide(doc) == deny("wildcard_too_broad")
}

test_wildcard_tenant_level_is_too_broad if {
	doc := with_keys(object.union(wildcard_channel, {
		"address": {"tenant": null, "channel": "telemetry"},
		"blocks": [block("watch", "allow", ["subscribe"], "tenant", null)],
	}))
	decide(doc) == deny("wildcard_too_broad")
}

# -- tenants and subjects ---------------------------------------------------------------------------

test_wrong_tenant if {
	decide(with_keys({"address": {"tenant": "globex", "channel": "telemetry"}})) == deny("wrong_tenant")
}

test_tenant_wide_role_does_not_cross_tenants if {
	doc := with_keys({
		"address": {"tenant": "globex", "channel": "telemetry"},
		"blocks": [block("all", "allow", ["publish"], "tenant", null)],
	})
	decide(doc) == deny("wrong_tenant")
}

test_claimed_tenant_must_match if {
	decide(with_keys({"claimed_tenant": "globex"})) == deny("wrong_tenant")
	decide(with_keys({"claimed_tenant": "acme"})) == {"allowed": true, "reason": "connected"}
}

test_disabled_subject if {
	subject := object.union(base.subject, {"enabled": false})
	decide(with_keys({"subject": subject})) == deny("subject_disabled")
}

test_disabled_tenant_is_reported_before_a_disabled_subject if {
	subject := object.union(base.subject, {"enabled": false, "tenant_enabled": false})
	decide(with_keys({"subject": subject})) == deny("tenant_disabled")
}

test_unknown_subject if {
	decide(with_keys({"subject": null})) == deny("unknown_subject")
}

# -- connect ----------------------------------------------------------------------------------------

test_connect if {
	connect := with_keys({"action": "connect", "address": null, "topic": null, "connection": []})
	decide(connect) == {"allowed": true, "reason": "subject_active"}
	# only a tenant-scoped deny of connect refuses the session
	banned := object.union(connect, {"blocks": [
		block("pub", "deny", ["publish"], "tenant", null),
		block("chan", "deny", ["connect"], "channel", "telemetry"),
		block("ban", "deny", ["connect"], "tenant", null),
	]})
	decide(banned) == {"allowed": false, "reason": "denied_by_block", "block": 2}
}

# -- broker `$` topics: only topic-scoped blocks reach them -----------------------------------------

test_sys_topic_needs_a_topic_scoped_grant if {
	decide(with_keys(system_filter("$SYS/broker/load/#"))) == deny("system_topic")
	everything := block("all", "allow", ["subscribe"], "tenant", null)
	decide(with_keys(object.union(system_filter("$SYS/broker/load/#"), {"blocks": [everything]}))) == deny("system_topic")
}

test_sys_topic_scope_grants_what_it_covers if {
	grant := topic_block("stats", "allow", ["subscribe"], "$SYS/broker/#", true, true)
	doc := with_keys(object.union(system_filter("$SYS/broker/load/#"), {"blocks": [grant]}))
	decide(doc) == {"allowed": true, "reason": "role_grant", "block": 0}
	too_wide := topic_block("stats", "allow", ["subscribe"], "$SYS/broker/#", false, true)
	wide := with_keys(object.union(system_filter("$SYS/#"), {"blocks": [too_wide]}))
	decide(wide) == deny("system_topic")
}

test_sys_topic_deny_wins_when_it_overlaps if {
	doc := with_keys(object.union(system_filter("$SYS/broker/load/#"), {"blocks": [
		topic_block("stats", "allow", ["subscribe"], "$SYS/broker/#", true, true),
		topic_block("hide", "deny", ["subscribe"], "$SYS/broker/load/+", false, true),
	]}))
	decide(doc) == {"allowed": false, "reason": "denied_by_block", "block": 1}
}

test_outside_the_namespace if {
	decide(with_keys({"address": null, "topic": "foo/bar"})) == deny("outside_namespace")
}

# -- the shortcut clauses change cost, not answers -------------------------------------------------

# requests like the ones above, through `decision` and through `steps` alone
test_shortcuts_agree_with_the_steps if {
	grant_all := block("all", "allow", ["publish", "subscribe"], "tenant", null)
	docs := [
		base,
		with_keys({"connection": []}),
		with_keys({"action": "subscribe"}),
		with_keys({"channel_exists": false}),
		with_keys({"claimed_tenant": "acme"}),
		with_keys({"claimed_tenant": "globex"}),
		with_keys({"subject": null}),
		with_keys({"subject": object.union(base.subject, {"enabled": false})}),
		with_keys({"subject": object.union(base.subject, {"tenant_enabled": false})}),
		with_keys({"address": {"tenant": "globex", "channel": "telemetry"}}),
		with_keys({"blocks": [block("quiet", "deny", ["publish"], "channel", "telemetry")]}),
		with_keys({"blocks": [block("sub-only", "deny", ["subscribe"], "channel", "telemetry")]}),
		with_keys({"connection": [], "blocks": [block("all", "allow", ["publish"], "tenant", null)]}),
		with_keys({
			"connection": [],
			"blocks": [block("floor", "allow", ["publish"], "channel_group", "plant-floor")],
			"channel_groups": ["plant-floor"],
		}),
		with_keys({"address": {"tenant": "acme", "channel": "nowhere"}, "channel_exists": false}),
		# the same refusals for a subject that holds roles (the second clause)
		with_keys({"blocks": [grant_all], "address": {"tenant": "globex", "channel": "telemetry"}}),
		with_keys({"blocks": [grant_all], "claimed_tenant": "globex"}),
		with_keys({"blocks": [grant_all], "subject": object.union(base.subject, {"enabled": false})}),
		with_keys({"blocks": [grant_all], "subject": object.union(base.subject, {"tenant_enabled": false})}),
		with_keys(object.union(wildcard_channel, {"blocks": [grant_all]})),
		with_keys(wildcard_channel),
		with_keys(system_filter("$SYS/#")),
	]
	every doc in docs {
		decide(doc) == steps(doc)
	}
}
