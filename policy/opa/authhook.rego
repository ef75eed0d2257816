# The channel model in Rego: the same decision as `decide()` in authhook/evaluators/inhouse.py,
# step by step, with the same reason codes and details.
#
# Query: data.authhook.mqtt.decision
# Input: see policy/opa/README.md. Topic algebra (filter covering and overlap) is not done here: the
# caller precomputes it per block (`grants_topic`, `overlaps_topic`, `covers_channel`).
# Every branch of the `else` chain below yields a decision, so for a well-formed input the result is
# never undefined; an undefined result is treated by authhook as an evaluator failure (deny).

package authhook.mqtt

action := input.request.action

subject := input.subject

topic := input.target.topic

address := input.target.address

# -- blocks that mention the action, by position (the first matching block names the decision) ------

applies(block) if action in block.actions

denies(block) if {
	applies(block)
	block.effect == "deny"
}

allows(block) if {
	applies(block)
	block.effect == "allow"
}

# connect: a tenant-scoped deny refuses the session
connect_denies contains i if {
	some i, block in input.blocks
	denies(block)
	block.scope == "tenant"
}

# broker `$` topics: a topic-scoped deny whose filter overlaps the request
system_denies contains i if {
	some i, block in input.blocks
	denies(block)
	block.scope == "topic"
	block.overlaps_topic
}

# broker `$` topics: a topic-scoped allow whose filter covers (filter) or matches (name) the request
system_allows contains i if {
	some i, block in input.blocks
	allows(block)
	block.scope == "topic"
	block.grants_topic
}

# wildcard channel: any non-topic deny could apply to some channel the filter reaches
wildcard_denies contains i if {
	some i, block in input.blocks
	denies(block)
	block.scope != "topic"
}

# wildcard channel: needs a tenant-wide allow
wildcard_allows contains i if {
	some i, block in input.blocks
	allows(block)
	block.scope == "tenant"
}

channel_denies contains i if {
	some i, block in input.blocks
	denies(block)
	block.covers_channel
}

channel_allows contains i if {
	some i, block in input.blocks
	allows(block)
	block.covers_channel
}

first_block(indices) := input.blocks[min(indices)].id

connected if action in input.connection

# -- the decision ---------------------------------------------------------------------------------

verdict(allowed, reason, detail, by) := {"allowed": allowed, "reason": reason, "detail": detail, "decided_by": by}

unknown_subject_detail := "request names no username or subject id" if {
	input.request.key == null
} else := sprintf("no client or user `%s`", [input.request.key])

decision := verdict(false, "unknown_subject", unknown_subject_detail, null) if {
	subject == null
} else := verdict(
	false, "wrong_tenant",
	sprintf("broker claims tenant `%s`, subject is in `%s`", [input.request.claimed_tenant, subject.tenant]),
	null,
) if {
	input.request.claimed_tenant != null
	input.request.claimed_tenant != subject.tenant
} else := verdict(false, "tenant_disabled", sprintf("tenant `%s` is disabled", [subject.tenant]), null) if {
	not subject.tenant_enabled
} else := verdict(false, "subject_disabled", sprintf("`%s` is disabled", [subject.id]), null) if {
	not subject.enabled
} else := connect_decision if {
	action == "connect"
} else := verdict(false, "missing_topic", sprintf("%s without a topic", [action]), null) if {
	topic == null
} else := system_decision if {
	address == null
} else := verdict(
	false, "wildcard_too_broad",
	sprintf("`%s` has a wildcard tenant level and could reach other tenants", [topic]),
	null,
) if {
	address.tenant == null
} else := verdict(
	false, "wrong_tenant",
	sprintf("`%s` belongs to tenant `%s`, not `%s`", [topic, address.tenant, subject.tenant]),
	null,
) if {
	address.tenant != subject.tenant
} else := wildcard_decision if {
	address.channel == null
} else := channel_decision

connect_decision := verdict(false, "denied_by_block", sprintf("connect denied by %s", [by]), by) if {
	count(connect_denies) > 0
	by := first_block(connect_denies)
} else := verdict(true, "subject_active", sprintf("`%s` is active in tenant `%s`", [subject.id, subject.tenant]), null)

system_decision := verdict(
	false, "outside_namespace",
	sprintf("`%s` is outside the channel namespace", [topic]), null,
) if {
	not input.target.is_system
} else := verdict(false, "denied_by_block", sprintf("`%s` denied by %s", [topic, by]), by) if {
	count(system_denies) > 0
	by := first_block(system_denies)
} else := verdict(true, "role_grant", sprintf("`%s` granted by %s", [topic, by]), by) if {
	count(system_allows) > 0
	by := first_block(system_allows)
} else := verdict(false, "system_topic", sprintf("system topic `%s` is not granted", [topic]), null)

wildcard_decision := verdict(
	false, "denied_by_block",
	sprintf("wildcard filter could reach a channel denied by %s", [by]), by,
) if {
	count(wildcard_denies) > 0
	by := first_block(wildcard_denies)
} else := verdict(true, "role_grant", sprintf("tenant-wide `%s` from %s", [action, by]), by) if {
	count(wildcard_allows) > 0
	by := first_block(wildcard_allows)
} else := verdict(
	false, "wildcard_too_broad",
	sprintf("no tenant-wide `%s` grant for a wildcard channel", [action]), null,
)

channel_decision := verdict(
	false, "unknown_channel",
	sprintf("no channel `%s` in tenant `%s`", [address.channel, subject.tenant]), null,
) if {
	not input.channel_exists
} else := verdict(
	false, "denied_by_block",
	sprintf("`%s` on `%s` denied by %s", [action, address.channel, by]), by,
) if {
	count(channel_denies) > 0
	by := first_block(channel_denies)
} else := verdict(
	true, "connected",
	sprintf("`%s` is connected to `%s` for %s", [subject.id, address.channel, action]),
	sprintf("connection:%s/%s", [subject.id, address.channel]),
) if {
	connected
} else := verdict(
	true, "role_grant",
	sprintf("`%s` on `%s` granted by %s", [action, address.channel, by]), by,
) if {
	count(channel_allows) > 0
	by := first_block(channel_allows)
} else := verdict(
	false, "not_connected",
	sprintf("`%s` is not connected to `%s` for %s", [subject.id, address.channel, action]), null,
)
