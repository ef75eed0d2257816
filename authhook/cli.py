"""The ``authhook`` command: serve, import, check, explain, decisions, and CRUD for every entity.

Every command works on the store named by ``--store`` / ``AUTHHOOK_STORE_URL`` / the config file.
Secrets are read from standard input (``--secret-stdin``) or generated, never taken as arguments, so
they do not end up in shell history or ``ps``. Exit status: 0 success or allow, 1 deny, 2 error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from authhook.config import Settings, load_settings
from authhook.credentials import generate_client_secret
from authhook.decision_log import DecisionFilter, parse_since, read_events
from authhook.errors import AuthhookError, InvalidInput, StoreError
from authhook.models import Action, AuthzRequest
from authhook.pdp import PDP, make_request
from authhook.store import create_store
from authhook.store.base import (
    DOTTED_ID_RULE,
    AssigneeKind,
    Assignment,
    Block,
    Channel,
    Connection,
    Group,
    GroupKind,
    Role,
    SubjectKind,
    SubjectRecord,
    Tenant,
    dotted_ids_readable,
    is_topic_level_id,
)
from authhook.world import import_world, load_world

P = ParamSpec("P")
R = TypeVar("R")

EXIT_ALLOW, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def run_with_pdp(fn: Callable[..., Coroutine[Any, Any, int | None]]) -> Callable[..., None]:
    """Open a PDP on the configured store, run the command, close it, map errors to exit status 2."""

    @click.pass_context
    @wraps(fn)
    def wrapper(ctx: click.Context, /, *args: Any, **kwargs: Any) -> None:
        async def main() -> int | None:
            async with PDP.from_settings(_settings(ctx), watch_sessions=False) as pdp:
                return await fn(pdp, *args, **kwargs)

        try:
            status = asyncio.run(main())
        except AuthhookError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except ValueError as exc:  # pydantic validation of entity arguments
            click.echo(f"error: {_first_line(exc)}", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(status or 0)

    return wrapper


def _first_line(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"][:1].lower() + first["msg"][1:]
        return f"{where}: {message}" if where else message
    return str(exc).splitlines()[0]


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, default=str))


def _actions(value: str) -> frozenset[Action]:
    try:
        return frozenset(Action(a.strip()) for a in value.split(",") if a.strip())
    except ValueError:
        raise click.BadParameter(f"`{value}`: use publish, subscribe (comma-separated)") from None


def _read_secret(prompt: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    return value


@click.group()
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="YAML/TOML config")
@click.option("--store", "store_url", help="store URL, e.g. sqlite:///authhook.db (env AUTHHOOK_STORE_URL)")
@click.version_option(package_name="authhook")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, store_url: str | None) -> None:
    """authhook: authorization back end for MQTT brokers."""
    try:
        ctx.obj = load_settings(config_file, store_url=store_url)
    except AuthhookError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


# -- serving and deciding ---------------------------------------------------------------------------


@cli.command()
@click.option("--host", help="listen address (default 127.0.0.1)")
@click.option("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the HTTP policy decision point."""
    import logging

    from authhook.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(ctx)
    http = settings.http.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    try:
        dotted = asyncio.run(_dotted_ids(settings))
        if dotted is None:
            logging.getLogger("authhook.cli").warning(
                "store unavailable at start: tenant and channel ids were not checked for `.`"
            )
        elif dotted:
            shown = ", ".join(dotted[:10]) + (f" and {len(dotted) - 10} more" if len(dotted) > 10 else "")
            raise InvalidInput(
                f"{DOTTED_ID_RULE}; this store holds {shown}, written before that rule: remove them "
                "(`authhook tenant rm`, `authhook channel rm`) and import them again under ids without `.`"
            )
        asyncio.run(run_server(settings.model_copy(update={"http": http})))
    except AuthhookError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


async def _dotted_ids(settings: Settings) -> list[str] | None:
    """Tenant and channel ids holding `.`, written before tenant and channel ids had to be topic levels
    RabbitMQ cannot misread; None when the store cannot be opened yet (``serve`` then retries it in the
    background, and this check is skipped)."""
    store = create_store(settings.store_url, deadline_s=settings.store_deadline_s)
    try:
        await store.open()
    except StoreError:
        return None
    try:
        with dotted_ids_readable():
            tenants, channels = await store.list_tenants(), await store.list_channels()
    finally:
        await store.close()
    found = [f"tenant `{t.id}`" for t in tenants if not is_topic_level_id(t.id)]
    found += [f"channel `{c.id}` of tenant `{c.tenant}`" for c in channels if not is_topic_level_id(c.id)]
    return found


@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@run_with_pdp
async def import_(pdp: PDP, file: Path) -> int:
    """Load a YAML/JSON world file (creates or updates; see README)."""
    counts = await import_world(pdp.store, pdp.hasher, load_world(file))
    _echo_json({"imported": counts})
    return 0


def _request_options(fn: Callable[P, R]) -> Callable[P, R]:
    for option in reversed(
        [
            click.argument("action", type=click.Choice([a.value for a in Action])),
            click.argument("username"),
            click.argument("topic", required=False),
            click.option("--client-id", help="MQTT client id"),
            click.option("--tenant", help="tenant the broker claims for the session"),
            click.option("--qos", type=click.IntRange(0, 2)),
            click.option("--retain", is_flag=True),
        ]
    ):
        fn = option(fn)
    return fn


def _request(fields: dict[str, Any]) -> AuthzRequest:
    """The request that ``check`` and ``explain`` take from their shared arguments."""
    return make_request(fields.pop("action"), fields.pop("username"), fields.pop("topic"), **fields)


@cli.command()
@_request_options
@run_with_pdp
async def check(pdp: PDP, **fields: Any) -> int:
    """Decide one request; print the decision as JSON. Exit 0 allow, 1 deny."""
    decision = await pdp.authorize(_request(fields), broker="cli", hook="check")
    _echo_json(decision.to_dict())
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


@cli.command()
@_request_options
@run_with_pdp
async def explain(pdp: PDP, **fields: Any) -> int:
    """Decide one request and show every step that led there. Exit 0 allow, 1 deny."""
    explanation = await pdp.explain(_request(fields))
    _echo_json(explanation.to_dict())
    return EXIT_ALLOW if explanation.decision.allowed else EXIT_DENY


@cli.command()
@click.argument("username")
@click.option("--client-id")
@click.option("--secret-stdin", is_flag=True, help="read the secret/password from standard input")
@run_with_pdp
async def authenticate(pdp: PDP, username: str, client_id: str | None, secret_stdin: bool) -> int:
    """Check a CONNECT: username plus secret or password. Exit 0 allow, 1 deny."""
    secret = sys.stdin.readline().rstrip("\n") if secret_stdin else click.prompt("secret", hide_input=True)
    decision = await pdp.authenticate(username, secret, client_id=client_id, broker="cli", hook="authenticate")
    _echo_json(decision.to_dict())
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


@cli.command()
@click.option("--client", help="subject id, username or MQTT client id")
@click.option("--channel")
@click.option("--tenant")
@click.option("--allowed/--denied", "allowed", default=None, help="only allows / only denials")
@click.option("--since", help="10m, 2h, 1d or an ISO-8601 time")
@click.option("--broker")
@click.option("--limit", type=int, default=100, show_default=True, help="newest N (0 = all)")
@click.option("--follow", "-f", is_flag=True, help="keep printing new decisions")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("--file", "log_file", type=click.Path(path_type=Path, dir_okay=False), help="decision log file")
@click.pass_context
def decisions(
    ctx: click.Context,
    client: str | None,
    channel: str | None,
    tenant: str | None,
    allowed: bool | None,
    since: str | None,
    broker: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
    log_file: Path | None,
) -> None:
    """Query the decision log (the JSON-lines file the server writes)."""
    path = log_file or _settings(ctx).resolved_decision_log_path()
    if path is None:
        click.echo("error: no decision log file is configured for this store", err=True)
        sys.exit(EXIT_ERROR)
    try:
        where = DecisionFilter(client, channel, tenant, allowed, parse_since(since) if since else None, broker)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    show = _show_json if as_json else _show_line
    try:
        handle = path.open()
    except FileNotFoundError:
        if not follow:
            return
        path.touch()
        handle = path.open()
    with handle:
        # Only the newest `limit` matches are kept while scanning, so a large log needs no large memory.
        newest: deque[dict[str, Any]] | list[dict[str, Any]]
        newest = deque(read_events(handle, where), maxlen=limit) if limit > 0 else list(read_events(handle, where))
        for event in newest:
            show(event)
        while follow:
            line = handle.readline()
            if not line:
                time.sleep(0.2)
                continue
            for event in read_events([line], where):
                show(event)


def _show_json(event: dict[str, Any]) -> None:
    click.echo(json.dumps(event), nl=True)


def _show_line(event: dict[str, Any]) -> None:
    verdict = "ALLOW" if event["allowed"] else "DENY "
    topic = event.get("topic") or ""
    click.echo(
        f"{event['time']} {verdict} {event['action']:<9} {event.get('subject') or '-'} {topic} "
        f"[{event['reason']}] {event.get('decided_by') or ''} ({event['broker']}/{event['hook']}, "
        f"{event['cache']}, {event['latency_us']}µs)"
    )


# -- CRUD ---------------------------------------------------------------------------------------------


def _listing(items: list[Any]) -> None:
    for item in items:
        if isinstance(item, tuple):
            model, extra = item
            data = model.model_dump(mode="json")
            data["members" if isinstance(model, Group) else "assignments"] = [
                e if isinstance(e, str) else f"{e.assignee_kind.value}:{e.assignee}" for e in extra
            ]
            _echo_json(data)
        else:
            _echo_json(item.model_dump(mode="json"))


@cli.group()
def tenant() -> None:
    """Tenants (domains)."""


@tenant.command("add")
@click.argument("tenant_id")
@click.option("--name", default="")
@run_with_pdp
async def tenant_add(pdp: PDP, tenant_id: str, name: str) -> None:
    await pdp.store.put_tenant(Tenant(id=tenant_id, name=name))


@tenant.command("list")
@run_with_pdp
async def tenant_list(pdp: PDP) -> None:
    _listing(await pdp.store.list_tenants())


@tenant.command("rm")
@click.argument("tenant_id")
@run_with_pdp
async def tenant_rm(pdp: PDP, tenant_id: str) -> None:
    """Delete a tenant and everything in it."""
    await pdp.store.delete_tenant(tenant_id)


for _enabled in (True, False):

    def _make_toggle(enabled: bool) -> None:
        @tenant.command("enable" if enabled else "disable")
        @click.argument("tenant_id")
        @run_with_pdp
        async def toggle(pdp: PDP, tenant_id: str) -> None:
            current = {t.id: t for t in await pdp.store.list_tenants()}.get(tenant_id)
            if current is None:
                raise InvalidInput(f"no tenant `{tenant_id}`")
            await pdp.store.put_tenant(current.model_copy(update={"enabled": enabled}))

    _make_toggle(_enabled)


def _subject_group(kind: SubjectKind) -> click.Group:
    noun = kind.value

    @cli.group(name=noun)
    def group() -> None:
        pass

    group.help = (
        "Clients (devices) authenticating with a secret."
        if kind is SubjectKind.CLIENT
        else ("Users authenticating with a password (argon2id).")
    )

    @group.command("add")
    @click.argument("tenant_id")
    @click.argument("subject_id")
    @click.option("--name", default="")
    @click.option("--secret-stdin", is_flag=True, help="read the secret/password from standard input")
    @run_with_pdp
    async def add(pdp: PDP, tenant_id: str, subject_id: str, name: str, secret_stdin: bool) -> None:
        record = SubjectRecord(id=subject_id, tenant=tenant_id, kind=kind, name=name)
        if kind is SubjectKind.CLIENT:
            generated = not secret_stdin
            secret = generate_client_secret() if generated else _read_secret("secret", True)
            stored = pdp.hasher.hash_client_secret(secret)
            await pdp.store.put_subject(record, stored)
            if generated:  # shown once; only its keyed hash is stored
                _echo_json({"client": subject_id, "secret": secret})
        else:
            password = _read_secret("password", secret_stdin)
            await pdp.store.put_subject(record, pdp.hasher.hash_password(password))

    @group.command("list")
    @click.option("--tenant", "tenant_id")
    @run_with_pdp
    async def list_(pdp: PDP, tenant_id: str | None) -> None:
        _listing([s for s in await pdp.store.list_subjects(tenant_id) if s.kind is kind])

    @group.command("rm")
    @click.argument("subject_id")
    @run_with_pdp
    async def rm(pdp: PDP, subject_id: str) -> None:
        await pdp.store.delete_subject(subject_id)

    @group.command("disable")
    @click.argument("subject_id")
    @run_with_pdp
    async def disable(pdp: PDP, subject_id: str) -> None:
        await pdp.store.set_subject_enabled(subject_id, False)

    @group.command("enable")
    @click.argument("subject_id")
    @run_with_pdp
    async def enable(pdp: PDP, subject_id: str) -> None:
        await pdp.store.set_subject_enabled(subject_id, True)

    return group


_subject_group(SubjectKind.CLIENT)
_subject_group(SubjectKind.USER)


@cli.group()
def channel() -> None:
    """Channels: message buses addressed by topics."""


@channel.command("add")
@click.argument("tenant_id")
@click.argument("channel_id")
@click.option("--name", default="")
@run_with_pdp
async def channel_add(pdp: PDP, tenant_id: str, channel_id: str, name: str) -> None:
    await pdp.store.put_channel(Channel(id=channel_id, tenant=tenant_id, name=name))


@channel.command("list")
@click.option("--tenant", "tenant_id")
@run_with_pdp
async def channel_list(pdp: PDP, tenant_id: str | None) -> None:
    _listing(await pdp.store.list_channels(tenant_id))


@channel.command("rm")
@click.argument("tenant_id")
@click.argument("channel_id")
@run_with_pdp
async def channel_rm(pdp: PDP, tenant_id: str, channel_id: str) -> None:
    await pdp.store.delete_channel(tenant_id, channel_id)


@cli.command("connect")
@click.argument("tenant_id")
@click.argument("client_id")
@click.argument("channel_id")
@click.option("--actions", default="publish,subscribe", show_default=True)
@run_with_pdp
async def connect_cmd(pdp: PDP, tenant_id: str, client_id: str, channel_id: str, actions: str) -> None:
    """Connect a client to a channel for publish and/or subscribe."""
    await pdp.store.connect(
        Connection(tenant=tenant_id, client=client_id, channel=channel_id, actions=_actions(actions))
    )


@cli.command("disconnect")
@click.argument("tenant_id")
@click.argument("client_id")
@click.argument("channel_id")
@click.option("--actions", default="publish,subscribe", show_default=True)
@run_with_pdp
async def disconnect_cmd(pdp: PDP, tenant_id: str, client_id: str, channel_id: str, actions: str) -> None:
    """Revoke a connection (or some of its actions); denied from the very next decision."""
    await pdp.store.disconnect(tenant_id, client_id, channel_id, _actions(actions))


@cli.command("connections")
@click.option("--tenant", "tenant_id")
@run_with_pdp
async def connections_cmd(pdp: PDP, tenant_id: str | None) -> None:
    """List connections."""
    _listing(await pdp.store.list_connections(tenant_id))


@cli.group("group")
def group_cmd() -> None:
    """Groups of subjects or of channels (nestable)."""


@group_cmd.command("add")
@click.argument("tenant_id")
@click.argument("group_id")
@click.option("--kind", type=click.Choice([k.value for k in GroupKind]), required=True)
@click.option("--parent")
@click.option("--name", default="")
@run_with_pdp
async def group_add(pdp: PDP, tenant_id: str, group_id: str, kind: str, parent: str | None, name: str) -> None:
    await pdp.store.put_group(Group(id=group_id, tenant=tenant_id, kind=GroupKind(kind), name=name, parent=parent))


@group_cmd.command("rm")
@click.argument("tenant_id")
@click.argument("group_id")
@run_with_pdp
async def group_rm(pdp: PDP, tenant_id: str, group_id: str) -> None:
    await pdp.store.delete_group(tenant_id, group_id)


@group_cmd.command("list")
@click.option("--tenant", "tenant_id")
@run_with_pdp
async def group_list(pdp: PDP, tenant_id: str | None) -> None:
    _listing(await pdp.store.list_groups(tenant_id))


@group_cmd.command("add-member")
@click.argument("tenant_id")
@click.argument("group_id")
@click.argument("member_id")
@run_with_pdp
async def group_add_member(pdp: PDP, tenant_id: str, group_id: str, member_id: str) -> None:
    await pdp.store.add_member(tenant_id, group_id, member_id)


@group_cmd.command("rm-member")
@click.argument("tenant_id")
@click.argument("group_id")
@click.argument("member_id")
@run_with_pdp
async def group_rm_member(pdp: PDP, tenant_id: str, group_id: str, member_id: str) -> None:
    await pdp.store.remove_member(tenant_id, group_id, member_id)


def parse_block(spec: str, index: int) -> Block:
    """``scope=tenant;actions=subscribe;effect=deny`` or ``scope=channel:ID;actions=publish,subscribe``."""
    fields: dict[str, str] = {}
    for part in spec.split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidInput(f"block `{spec}`: expected key=value pairs separated by `;`")
        fields[key.strip()] = value.strip()
    scope, _, ref = fields.get("scope", "").partition(":")
    return Block(
        id=fields.get("id", f"b{index}"),
        scope=scope,
        ref=ref or None,
        actions=_actions(fields.get("actions", "")),
        effect=fields.get("effect", "allow"),
    )


@cli.group()
def role() -> None:
    """Roles: bundles of permission blocks (scope, actions, effect) assigned to subjects or groups."""


@role.command("add")
@click.argument("tenant_id")
@click.argument("role_id")
@click.option(
    "--block",
    "blocks",
    multiple=True,
    help="scope=tenant|channel:ID|channel_group:ID|topic:$SYS/#;"
    "actions=publish,subscribe[;effect=allow|deny][;id=NAME] (repeatable)",
)
@click.option("--name", default="")
@run_with_pdp
async def role_add(pdp: PDP, tenant_id: str, role_id: str, blocks: tuple[str, ...], name: str) -> None:
    """Create or replace a role."""
    parsed = tuple(parse_block(spec, i) for i, spec in enumerate(blocks, start=1))
    await pdp.store.put_role(Role(id=role_id, tenant=tenant_id, name=name, blocks=parsed))


@role.command("rm")
@click.argument("tenant_id")
@click.argument("role_id")
@run_with_pdp
async def role_rm(pdp: PDP, tenant_id: str, role_id: str) -> None:
    await pdp.store.delete_role(tenant_id, role_id)


@role.command("list")
@click.option("--tenant", "tenant_id")
@run_with_pdp
async def role_list(pdp: PDP, tenant_id: str | None) -> None:
    _listing(await pdp.store.list_roles(tenant_id))


def _assignment(tenant_id: str, role_id: str, assignee: str) -> Assignment:
    kind, _, ref = assignee.partition(":") if assignee.startswith("group:") else ("subject", "", assignee)
    return Assignment(tenant=tenant_id, role=role_id, assignee_kind=AssigneeKind(kind), assignee=ref)


@role.command("assign")
@click.argument("tenant_id")
@click.argument("role_id")
@click.argument("assignee")
@run_with_pdp
async def role_assign(pdp: PDP, tenant_id: str, role_id: str, assignee: str) -> None:
    """Assign to a subject id, or to `group:<id>`."""
    await pdp.store.assign(_assignment(tenant_id, role_id, assignee))


@role.command("unassign")
@click.argument("tenant_id")
@click.argument("role_id")
@click.argument("assignee")
@run_with_pdp
async def role_unassign(pdp: PDP, tenant_id: str, role_id: str, assignee: str) -> None:
    await pdp.store.unassign(_assignment(tenant_id, role_id, assignee))


def main() -> None:
    cli(prog_name="authhook")
