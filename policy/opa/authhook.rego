# The channel model in Rego: the same decision as `decide()` in authhook/evaluators/inhouse.py, step by
# step, with the same reason codes.
#
# Query: data.authhook.mqtt.decision
#   -> {"allowed": <bool>, "reason": <code>}, plus "block": <position in input.blocks> when a permission
#      block decided (reasons denied_by_block and role_grant).
# Input: see policy/README.md. The policy decides everything: which blocks mention the action, which
# channels a block covers (scope, ref, input.address.channel, input.channel_groups), deny over allow,
# connection over role grant, the order of the steps. Only MQTT topic-filter algebra for broker `$`
# topics arrives precomputed per topic-scoped block (`grants_topic`, `overlaps_topic`).
# authhook turns the reason code and the facts it sent into the human-readable detail.
#
# Written for speed under rego-cpp, where every expression and rule evaluation costs microseconds:
# no string building, locals instead of repeated lookups, and the common request answered first.

package authhook.mqtt

# -- the decision -----------------------------------------------------------------------------------

# The first clause answers the commonest request outright: no permission blocks that could deny, the
# subject on its own channel (`own_channel`, inlined here because this is the hot path), the channel
# exists and the subject is connected to it for the action. The second takes any other request on its
# own channel straight to the channel step. Both only skip `steps` that cannot apply to such a request,
# so all three give the same answers; authhook_test.rego checks that they do.
decision := {"allowed": true, "reason": "connected"} if {
	input.blocks == []
	subject := input.subject
	subject.enabled == true
	subject.tenant_enabled == true
	input.claimed_tenant == null
	address := input.address
	address.tenant == subject.tenant
	is_string(address.channel)
	input.channel_exists == true
	input.action in input.connection
} else := channel_step if {
	own_channel
} else := steps

# An enabled subject of an enabled tenant, not claiming another tenant, on one named channel of its own
# tenant (a non-null address implies publish or subscribe, with a topic).
own_channel if {
	s := input.subject
	s.enabled == true
	s.tenant_enabled == true
	input.claimed_tenant == null
	a := input.address
	a.tenant == s.tenant
	is_string(a.channel)
}

# The model, step by step, in the in-house order; the first step that applies decides.
steps := {"allowed": false, "reason": "unknown_subject"} if {
	input.subject == null
} else := {"allowed": false, "reason": "wrong_tenant"} if {
	input.claimed_tenant != null
	input.claimed_tenant != input.subject.tenant
} else := {"allowed": false, "reason": "tenant_disabled"} if {
	input.subject.tenant_enabled != true
} else := {"allowed": false, "reason": "subject_disabled"} if {
	input.subject.enabled != true
} else := connect_step if {
	input.action == "connect"
} else := {"allowed": false, "reason": "missing_topic"} if {
	input.topic == null
} else := system_step if {
	input.address == null
} else := {"allowed": false, "reason": "wildcard_too_broad"} if {
	input.address.tenant == null # a wildcard tenant level could reach other tenants
} else := {"allowed": false, "reason": "wrong_tenant"} if {
	input.address.tenant != input.subject.tenant
} else := wildcard_step if {
	input.address.channel == null
} else := channel_step if {
	is_string(input.address.channel) # and for a malformed input: no answer (undefined), not a guess
}

# -- one named channel: unknown channel, then deny wins, then connection, then role grant ----------

channel_step := {"allowed": false, "reason": "unknown_channel"} if {
	input.channel_exists != true
} else := {"allowed": false, "reason": "denied_by_block", "block": i} if {
	i := first_channel_block("deny")
} else := {"allowed": true, "reason": "connected"} if {
	input.action in input.connection
} else := {"allowed": true, "reason": "role_grant", "block": i} if {
	i := first_channel_block("allow")
} else := {"allowed": false, "reason": "not_connected"}

# Does a block cover the requested channel? Tenant scope covers every channel of the tenant, channel
# scope the channel it names, channel-group scope every channel in the group or its subgroups
# (input.channel_groups: the groups the channel belongs to, transitively). Topic scope covers none.
covers_channel(block) if block.scope == "tenant"

covers_channel(block) if {
	block.scope == "channel"
	block.ref == input.address.channel
}

covers_channel(block) if {
	block.scope == "channel_group"
	block.ref in input.channel_groups
}

# the position of the first block with this effect that mentions the action and covers the channel
first_channel_block(effect) := first({j |
	block := input.blocks[j]
	block.effect == effect
	input.action in block.actions
	covers_channel(block)
})

# -- connect: only a tenant-scoped deny refuses the session ----------------------------------------

connect_step := {"allowed": false, "reason": "denied_by_block", "block": i} if {
	i := first({j |
		block := input.blocks[j]
		block.effect == "deny"
		input.action in block.actions
		block.scope == "tenant"
	})
} else := {"allowed": true, "reason": "subject_active"}

# -- outside the channel namespace: only broker `$` topics, and only by topic-scoped blocks ---------

# a deny whose filter overlaps the request wins; an allow must cover (filter) or match (name) it
system_step := {"allowed": false, "reason": "outside_namespace"} if {
	input.system != true
} else := {"allowed": false, "reason": "denied_by_block", "block": i} if {
	i := first({j |
		block := input.blocks[j]
		block.effect == "deny"
		input.action in block.actions
		block.scope == "topic"
		block.overlaps_topic == true
	})
} else := {"allowed": true, "reason": "role_grant", "block": i} if {
	i := first({j |
		block := input.blocks[j]
		block.effect == "allow"
		input.action in block.actions
		block.scope == "topic"
		block.grants_topic == true
	})
} else := {"allowed": false, "reason": "system_topic"}

# -- a wildcard channel level: it reaches every channel of the tenant ------------------------------

# any deny on some channel could apply; only a tenant-wide allow covers every channel
wildcard_step := {"allowed": false, "reason": "denied_by_block", "block": i} if {
	i := first({j |
		block := input.blocks[j]
		block.effect == "deny"
		input.action in block.actions
		block.scope != "topic"
	})
} else := {"allowed": true, "reason": "role_grant", "block": i} if {
	i := first({j |
		block := input.blocks[j]
		block.effect == "allow"
		input.action in block.actions
		block.scope == "tenant"
	})
} else := {"allowed": false, "reason": "wildcard_too_broad"}

# Blocks are in store order: the first one that applies names the decision. (The comprehensions above
# name their position `j`, never the `i` they are assigned to: rego-cpp 1.5.2 gets `i := f({i | ...})`
# wrong.)
first(positions) := min(positions) if count(positions) > 0
