"""The ``aiam`` command: init, keys, agents, delegation, tokens, policies, approvals, audit, demo.

Wrong input gives one clear line on stderr and a non-zero exit, never a traceback. Tokens are
printed only by the commands whose job is to print them (``delegate``, ``subdelegate``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.errors import AgenticIAMError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="aiam",
    help="agentic-iam: delegated, ephemeral execution identity for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Manage the broker's Ed25519 signing keys.", no_args_is_help=True)
agents_app = typer.Typer(help="Inspect the agent registry.", no_args_is_help=True)
token_app = typer.Typer(help="Inspect and verify execution tokens.", no_args_is_help=True)
policy_app = typer.Typer(help="Validate, test and describe Cedar policies.", no_args_is_help=True)
approvals_app = typer.Typer(help="List and answer pending approval requests.",
                            no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(agents_app, name="agents")
app.add_typer(token_app, name="token")
app.add_typer(policy_app, name="policy")
app.add_typer(approvals_app, name="approvals")

console = Console()
if not console.is_terminal:
    # Piped output keeps whole ids on one line instead of folding them at 80 columns.
    console = Console(width=160)
err = Console(stderr=True, width=160)

DEFAULT_AUDIENCE = "agentic-iam"
RegistryOpt = Annotated[Path | None, typer.Option(
    "--registry", "-r", help="Agent registry YAML file or directory "
    "[default: $AIAM_REGISTRY or the bundled demo registry].")]
KeysOpt = Annotated[Path, typer.Option(
    "--keys", "-k", help="Private key file from `aiam keys generate` [default: aiam-keys.json].")]
AudienceOpt = Annotated[str, typer.Option("--audience", help="Token audience.")]
StoreOpt = Annotated[str, typer.Option(
    "--store", help="Store: `memory`, `sqlite:PATH` or `redis://HOST:PORT/DB` "
    "[default: $AIAM_STORE or memory].")]


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn library errors and bad files into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except AgenticIAMError as exc:
            _fail(str(exc))
        except (OSError, ValueError) as exc:
            _fail(str(exc))
        return None

    return wrapper  # type: ignore[return-value]


def _registry(path: Path | None) -> Any:
    from agentic_iam.core.registry import AgentRegistry

    chosen = path or Path(os.environ.get("AIAM_REGISTRY") or default_registry_path())
    return AgentRegistry.from_yaml(chosen)


def _keyset(path: Path) -> Any:
    from agentic_iam.core.keys import KeySet

    if not path.exists():
        _fail(f"no key file `{path}`: create one with `aiam keys generate --out {path}`")
    return KeySet.load(path)


def open_store(spec: str) -> Any:
    """A store from ``memory``, ``sqlite:PATH`` or ``redis://…``."""
    from agentic_iam.project import open_store as _open

    return _open(spec)


def _default_keys() -> Path:
    return Path(os.environ.get("AIAM_KEYS", "aiam-keys.json"))


def _default_store() -> str:
    return os.environ.get("AIAM_STORE", "memory")


# --- keys -------------------------------------------------------------------------------------


@keys_app.command("generate")
@friendly
def keys_generate(
    issuer: Annotated[str, typer.Option(help="The broker's issuer URL (the `iss` claim).")] =
    "https://aiam.local",
    out: Annotated[Path, typer.Option(help="Where to write the private key file (mode 0600).")] =
    Path("aiam-keys.json"),
    jwks: Annotated[Path | None, typer.Option(help="Also write the public JWKS here.")] = None,
    rotate: Annotated[bool, typer.Option(help="Add a new active key to an existing file.")] =
    False,
) -> None:
    """Create (or rotate) the broker's Ed25519 signing key."""
    from agentic_iam.core.keys import KeySet

    if rotate:
        keyset = _keyset(out)
        keyset.rotate()
    else:
        if out.exists():
            _fail(f"`{out}` exists; use --rotate to add a key or choose another --out")
        keyset = KeySet.generate(issuer)
    keyset.save(out)
    if jwks is not None:
        jwks.write_text(json.dumps(keyset.to_jwks(), indent=2))
    console.print(f"wrote [bold]{out}[/bold] (issuer {keyset.issuer}, active key "
                  f"{keyset.active.kid})")


@keys_app.command("jwks")
@friendly
def keys_jwks(keys: KeysOpt = Path("aiam-keys.json")) -> None:
    """Print the public JWKS of a key file."""
    print(json.dumps(_keyset(keys).to_jwks(), indent=2))


# --- agents -----------------------------------------------------------------------------------


@agents_app.command("list")
@friendly
def agents_list(registry: RegistryOpt = None) -> None:
    """List the agents of the registry."""
    reg = _registry(registry)
    table = Table(title="agents")
    for column in ("id", "name", "owner", "trust", "policy set", "actions", "status"):
        table.add_column(column)
    for agent in reg.list_agents():
        table.add_row(agent.id, agent.name, agent.owner, str(agent.trust_level), agent.policy_set,
                      ", ".join(sorted(agent.actions)), agent.status)
    console.print(table)


@agents_app.command("show")
@friendly
def agents_show(agent_id: Annotated[str, typer.Argument(help="Agent id.")],
                registry: RegistryOpt = None) -> None:
    """Show one agent: its limits and what each tool does."""
    reg = _registry(registry)
    agent = reg.get(agent_id)
    if agent is None:
        known = ", ".join(a.id for a in reg.list_agents())
        _fail(f"unknown agent `{agent_id}` (known: {known})")
    console.print(f"[bold]{agent.name}[/bold] ({agent.id}) — {agent.description}")
    console.print(f"owner {agent.owner} · trust {agent.trust_level} · policy set "
                  f"{agent.policy_set} · status {agent.status}")
    console.print(f"max ttl {agent.max_ttl_s}s · max budget {agent.max_budget.as_dict()} · "
                  f"max risk {agent.max_risk}")
    console.print(f"memory scopes: {', '.join(sorted(agent.memory_scopes)) or '-'} · may "
                  f"delegate to: {', '.join(sorted(agent.may_delegate_to)) or '-'}")
    table = Table(title="tools")
    for column in ("tool", "action", "risk", "output", "consequential", "cost", "targets",
                   "arguments"):
        table.add_column(column)
    for tool in agent.tools.values():
        cost = str(tool.cost) if tool.cost is not None else (
            f"arg `{tool.cost_argument}`" if tool.cost_argument else "-")
        table.add_row(tool.name, tool.action, str(tool.risk), tool.output_trust,
                      "yes" if tool.consequential else "no", cost,
                      ", ".join(sorted(tool.target_arguments)) or "-",
                      ", ".join(f"{k}: {v}" for k, v in tool.arguments.items()) or "-")
    console.print(table)


# --- delegation -------------------------------------------------------------------------------


def _budget_options(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"bad --budget `{item}`: use e.g. tool_calls=20 or cost=500")
        out[name.strip()] = int(value)
    return out


def _broker(keys: Path, registry: Path | None, audience: str, store: str) -> Any:
    from agentic_iam.core.broker import DelegationBroker

    return DelegationBroker(_registry(registry), _keyset(keys), audience=audience,
                            store=open_store(store))


@app.command("delegate")
@friendly
def delegate(
    agent: Annotated[str, typer.Option(help="The agent that receives the delegation.")],
    allow: Annotated[list[str], typer.Option(
        help='A capability, e.g. "refund:create amount<=100 currency=USD" (repeatable). Clauses: '
        "arg<=N, arg>=N, arg<N, arg>N, arg=V, arg=V1|V2, arg^=PREFIX, arg~=REGEX; quote to force "
        'a string (account="1234").')],
    delegator: Annotated[str, typer.Option(help="The delegating human (or workload with "
                                           "--workload).")] = "alice@example.com",
    workload: Annotated[bool, typer.Option(help="The delegator is a workload.")] = False,
    purpose: Annotated[str, typer.Option(help="What the run is for.")] = "",
    ttl: Annotated[str, typer.Option(help="Lifetime: 900, 15m, 1h.")] = "15m",
    budget: Annotated[list[str] | None, typer.Option(
        help="Budget, e.g. tool_calls=20, cost=500, llm_tokens=10000 (repeatable).")] = None,
    risk: Annotated[int | None, typer.Option(help="Risk envelope.")] = None,
    depth: Annotated[int, typer.Option(help="How many times it may be sub-delegated.")] = 1,
    keys: KeysOpt = Path("aiam-keys.json"),
    registry: RegistryOpt = None,
    audience: AudienceOpt = DEFAULT_AUDIENCE,
    store: StoreOpt = "memory",
) -> None:
    """Mint an execution token and print it."""
    from agentic_iam.core.identity import Human, Workload
    from agentic_iam.core.registry import parse_duration

    principal = Workload(delegator) if workload else Human(delegator)
    broker = _broker(keys, registry, audience, store)
    token = broker.delegate(principal, agent, purpose, list(allow), parse_duration(ttl),
                            _budget_options(budget or []) or None, risk, depth=depth)
    print(token.token)


@app.command("subdelegate")
@friendly
def subdelegate(
    parent: Annotated[str, typer.Option(help="The parent token (or @FILE).")],
    agent: Annotated[str, typer.Option(help="The child agent.")],
    allow: Annotated[list[str], typer.Option(help="A narrower capability (repeatable).")],
    ttl: Annotated[str, typer.Option(help="Lifetime, inside the parent's window.")] = "5m",
    budget: Annotated[list[str] | None, typer.Option(help="Budget carved from the parent's.")]
    = None,
    risk: Annotated[int | None, typer.Option(help="Risk envelope.")] = None,
    keys: KeysOpt = Path("aiam-keys.json"),
    registry: RegistryOpt = None,
    audience: AudienceOpt = DEFAULT_AUDIENCE,
    store: StoreOpt = "memory",
) -> None:
    """Mint a narrower child token for another agent and print it."""
    from agentic_iam.core.registry import parse_duration

    broker = _broker(keys, registry, audience, store)
    token = broker.subdelegate(_read_token(parent), agent, list(allow), parse_duration(ttl),
                               _budget_options(budget or []) or None, risk)
    print(token.token)


@app.command("revoke")
@friendly
def revoke(
    token: Annotated[str, typer.Argument(help="Token (or @FILE) or jti to revoke.")],
    keys: KeysOpt = Path("aiam-keys.json"),
    registry: RegistryOpt = None,
    audience: AudienceOpt = DEFAULT_AUDIENCE,
    store: StoreOpt = "sqlite:aiam-store.db",
) -> None:
    """Revoke a token (and so every descendant) in a shared store."""
    jti = _broker(keys, registry, audience, store).revoke(_read_token(token))
    console.print(f"revoked {jti}")


# --- tokens -----------------------------------------------------------------------------------


def _read_token(value: str) -> str:
    if value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8").strip()
    if value == "-":
        return sys.stdin.read().strip()
    return value.strip()


def _unverified_claims(token: str) -> dict[str, Any]:
    from agentic_iam.core.keys import b64url_decode

    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS (three dot-separated segments)")
    try:
        header = json.loads(b64url_decode(parts[0]))
        payload = json.loads(b64url_decode(parts[1]))
    except ValueError:
        raise ValueError("the token's segments are not base64url JSON") from None
    if not isinstance(payload, dict) or not isinstance(header, dict):
        raise ValueError("the token's header and payload must be JSON objects")
    return {"header": header, "payload": payload}


def _when(ts: object) -> str:
    if type(ts) is not int:
        return repr(ts)
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@token_app.command("inspect")
@friendly
def token_inspect(
    token: Annotated[str, typer.Argument(help="Token, @FILE or - for stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw claims.")] = False,
) -> None:
    """Show a token's claims and delegation chain (WITHOUT verifying it; see `verify`)."""
    decoded = _unverified_claims(_read_token(token))
    payload = decoded["payload"]
    if as_json:
        print(json.dumps(decoded, indent=2, sort_keys=True))
        return
    console.print("[yellow]unverified: use `aiam token verify` to check the signature[/yellow]")
    table = Table(show_header=False)
    table.add_column("claim", style="bold")
    table.add_column("value")
    for claim in ("iss", "sub", "aud", "jti", "purpose", "depth"):
        table.add_row(claim, str(payload.get(claim)))
    for claim in ("iat", "nbf", "exp"):
        table.add_row(claim, _when(payload.get(claim)))
    delegator = payload.get("delegator") or {}
    table.add_row("delegator", f"{delegator.get('type')} {delegator.get('sub')} "
                  f"(via {delegator.get('iss')})")
    agent = payload.get("agent") or {}
    table.add_row("agent", f"{agent.get('id')} (trust {agent.get('trust')})")
    table.add_row("budget", json.dumps(payload.get("budget")))
    table.add_row("risk", json.dumps(payload.get("risk")))
    table.add_row("ancestors", ", ".join(payload.get("ancestors") or []) or "-")
    console.print(table)
    from agentic_iam.core.capabilities import Capability

    caps = Tree("[bold]capabilities[/bold]")
    for raw in payload.get("cap") or []:
        try:
            caps.add(Capability.from_json(raw).describe())
        except AgenticIAMError as exc:
            caps.add(f"[red]invalid: {exc}[/red]")
    console.print(caps)
    hops: list[dict[str, Any]] = []
    act = payload.get("act")
    while isinstance(act, dict):
        hops.append(act)
        act = act.get("act")
    chain = Tree(f"[bold]delegation chain[/bold] — {delegator.get('type')} "
                 f"{delegator.get('sub')}")
    node = chain
    for hop in reversed(hops):
        node = node.add(f"agent {hop.get('sub')} · execution {hop.get('exec')}")
    console.print(chain)
    console.print(f"{len(hops)} hop(s)")


@token_app.command("verify")
@friendly
def token_verify(
    token: Annotated[str, typer.Argument(help="Token, @FILE or - for stdin.")],
    keys: Annotated[Path | None, typer.Option(help="Private key file of the issuer.")] = None,
    jwks: Annotated[Path | None, typer.Option(help="Public JWKS of the issuer.")] = None,
    issuer: Annotated[str | None, typer.Option(help="Issuer of the JWKS (with --jwks).")] = None,
    audience: AudienceOpt = DEFAULT_AUDIENCE,
    max_lifetime: Annotated[int, typer.Option(help="Maximum lifetime in seconds.")] = 86400,
    store: StoreOpt = "memory",
) -> None:
    """Verify a token strictly: exit 0 when valid, 1 with the reason otherwise."""
    from agentic_iam.core.keys import KeySet
    from agentic_iam.core.tokens import TokenVerifier
    from agentic_iam.errors import TokenError

    if jwks is not None:
        if issuer is None:
            _fail("--jwks needs --issuer")
        keyset = KeySet.from_jwks(issuer, json.loads(jwks.read_text(encoding="utf-8")))
    else:
        keyset = _keyset(keys or _default_keys())
    backing = open_store(store)
    verifier = TokenVerifier(keyset, audience=audience, max_lifetime_s=max_lifetime,
                             revoked=backing.revoked)
    try:
        identity = verifier.verify(_read_token(token))
    except TokenError as exc:
        err.print(f"invalid ({type(exc).__name__}): {exc}", highlight=False)
        raise typer.Exit(1) from None
    left = identity.expires_at - int(time.time())
    console.print(f"valid: execution {identity.execution_id} · agent {identity.agent_id} · "
                  f"delegated by {identity.delegator_id} · expires in {left}s")


# --- policy -----------------------------------------------------------------------------------

PoliciesArg = Annotated[Path | None, typer.Argument(
    help="Policy directory [default: the project's, in a folder made by `aiam init`; else the "
    "bundled policies/].")]


@policy_app.command("schema")
@friendly
def policy_schema(registry: RegistryOpt = None,
                  out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")]
                  = None) -> None:
    """Print the Cedar schema generated from the registry."""
    from agentic_iam.core.policy.cedar import generate_schema

    text = json.dumps(generate_schema(_registry(registry)), indent=2, sort_keys=True)
    if out is not None:
        out.write_text(text + "\n")
        console.print(f"wrote {out}")
    else:
        print(text)


def _policy_inputs(path: Path | None, registry: Path | None
                   ) -> tuple[Path, Any, Path | None]:
    """The policy folder, registry and schema to check: the project's (`aiam init`) when run in
    its folder or given its `policies/` without --registry; else the bundled demo's."""
    from agentic_iam.project import CONFIG_FILE, read_config

    if registry is None:
        candidates = [Path(CONFIG_FILE)] if path is None else [path.parent / CONFIG_FILE,
                                                               path / CONFIG_FILE]
        for candidate in candidates:
            if candidate.is_file():
                config = read_config(candidate)
                if path is None or path.resolve() in (config.policies, config.file.parent):
                    return config.policies, _registry(config.registry), config.schema
    return path or default_policies_dir(), _registry(registry), None


@policy_app.command("validate")
@friendly
def policy_validate(path: PoliciesArg = None, registry: RegistryOpt = None) -> None:
    """Parse every policy and validate it against the schema."""
    from agentic_iam.core.policy.cedar import CedarEngine

    directory, reg, schema = _policy_inputs(path, registry)
    engine = CedarEngine.from_directory(directory, reg, schema_path=schema)
    console.print(f"valid: {engine.policy_count} policies in {directory}")


@policy_app.command("test")
@friendly
def policy_test(path: PoliciesArg = None, registry: RegistryOpt = None) -> None:
    """Run every ALLOW/ and DENY/ request fixture; exit 1 on any mismatch."""
    from agentic_iam.core.policy.cedar import CedarEngine
    from agentic_iam.core.policy.fixtures import load_fixtures, run_fixture

    directory, reg, schema = _policy_inputs(path, registry)
    engine = CedarEngine.from_directory(directory, reg, schema_path=schema)
    failures = 0
    fixtures = load_fixtures(directory)
    for fixture in fixtures:
        outcome = run_fixture(engine, reg, fixture)
        mark = "[green]ok[/green]  " if outcome.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {fixture.path}: expected {outcome.expected}, got "
                      f"{outcome.actual}", highlight=False)
        failures += not outcome.ok
    console.print(f"{len(fixtures) - failures}/{len(fixtures)} fixtures pass")
    if failures:
        raise typer.Exit(1)


# --- approvals --------------------------------------------------------------------------------


@approvals_app.command("list")
@friendly
def approvals_list(store: StoreOpt = "sqlite:aiam-store.db",
                   status: Annotated[str | None, typer.Option(help="Filter by status.")] =
                   "pending") -> None:
    """List approval requests in a shared store."""
    records = open_store(store).list_approvals(status)
    table = Table(title=f"approvals ({status or 'all'})")
    for column in ("id", "status", "agent", "delegator", "tool", "arguments", "why"):
        table.add_column(column)
    for record in records:
        payload = record.get("payload") or {}
        table.add_row(record["request_id"], record["status"], str(payload.get("agent_id")),
                      str(payload.get("delegator")), str(payload.get("tool")),
                      json.dumps(payload.get("arguments"), sort_keys=True),
                      "; ".join(payload.get("reasons") or []))
    console.print(table)


ApproverOpt = Annotated[str | None, typer.Option(
    "--approver", envvar="AIAM_APPROVER", show_default=False,
    help="Who answers: one of the configured approvers [default: $AIAM_APPROVER or your login "
    "name].")]
ApproversOpt = Annotated[str | None, typer.Option(
    "--approvers", envvar="AIAM_APPROVERS", show_default=False,
    help="Comma-separated ids of the configured approvers [default: $AIAM_APPROVERS].")]
AuditOpt = Annotated[Path | None, typer.Option(
    "--audit", envvar="AIAM_AUDIT", show_default=False,
    help="The project's JSONL audit log: every answer is recorded there [default: $AIAM_AUDIT].")]
AuditKeysOpt = Annotated[Path | None, typer.Option(
    "--keys", "-k", envvar="AIAM_KEYS", show_default=False,
    help="Sign the audit log's head with this key file [default: aiam-keys.json if present].")]


def _resolve(request_id: str, *, store: str, approver: str | None, approvers: str | None,
             audit: Path | None, keys: Path | None, approved: bool) -> None:
    """Answer one request as a configured approver, on the record (ApprovalManager.resolve)."""
    import getpass

    from agentic_iam.core.approvals import ApprovalManager
    from agentic_iam.core.provenance import HeadSigner, JsonlSink, Recorder

    if audit is None:
        _fail("every answer to an approval request is recorded: pass --audit PATH (the "
              "project's audit log) or set $AIAM_AUDIT")
    configured = [a.strip() for a in (approvers or "").split(",") if a.strip()]
    if not configured:
        _fail("no approvers are configured: pass --approvers ID[,ID...] or set $AIAM_APPROVERS")
    who = approver if approver is not None else getpass.getuser()
    signer = None
    key_path = keys if keys is not None else Path("aiam-keys.json")
    if keys is not None or key_path.exists():
        active = _keyset(key_path).active
        signer = HeadSigner(active.private_key, active.kid)
    backing = open_store(store)
    try:
        recorder = Recorder([JsonlSink(audit, signer=signer)])
        try:
            ApprovalManager(backing, recorder=recorder, approvers=configured).resolve(
                request_id, approved=approved, approver=who)
        finally:
            recorder.close()
    finally:
        backing.close()
    console.print(f"{'approved' if approved else 'denied'} {request_id} as {who}",
                  highlight=False)


@approvals_app.command("approve")
@friendly
def approvals_approve(request_id: str, store: StoreOpt = "sqlite:aiam-store.db",
                      approver: ApproverOpt = None, approvers: ApproversOpt = None,
                      audit: AuditOpt = None, keys: AuditKeysOpt = None) -> None:
    """Approve one pending request as a configured approver: that exact call may run once.

    The answer is recorded in the audit log (naming the approver) before it takes effect. The
    requesting agent, its execution and the agents of its delegation chain are refused.
    """
    _resolve(request_id, store=store, approver=approver, approvers=approvers, audit=audit,
             keys=keys, approved=True)


@approvals_app.command("deny")
@friendly
def approvals_deny(request_id: str, store: StoreOpt = "sqlite:aiam-store.db",
                   approver: ApproverOpt = None, approvers: ApproversOpt = None,
                   audit: AuditOpt = None, keys: AuditKeysOpt = None) -> None:
    """Deny one pending request as a configured approver (recorded in the audit log)."""
    _resolve(request_id, store=store, approver=approver, approvers=approvers, audit=audit,
             keys=keys, approved=False)


# --- store ------------------------------------------------------------------------------------

store_app = typer.Typer(help="Initialise a shared store and check its epoch (state loss).",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")
PrefixOpt = Annotated[str, typer.Option(help="Redis key prefix of the store.")]

# Redis settings that lose or evict state silently; `aiam store status` warns about each.
_REDIS_RISKS = {
    "appendonly": ("yes", "a restart loses everything since the last RDB snapshot; set "
                   "`appendonly yes`"),
    "maxmemory-policy": ("noeviction", "Redis may evict budgets and revocations under memory "
                         "pressure without any error; set `maxmemory-policy noeviction`"),
}


def _shared_store(spec: str, prefix: str, *, initialize: bool = False) -> Any:
    """A SQLite or Redis store for the `store` commands (a memory store has nothing to keep)."""
    if spec == "memory":
        _fail("a memory store lives and dies with its process: there is nothing to initialise "
              "or check (use sqlite:PATH or redis://HOST:PORT/DB)")
    if spec.startswith("sqlite:"):
        from agentic_iam.core.store.sqlite import SqliteStore

        return SqliteStore(spec.removeprefix("sqlite:"), initialize=initialize)
    if spec.startswith(("redis://", "rediss://")):
        from agentic_iam.core.store.redis import RedisStore

        return RedisStore(spec, prefix=prefix, initialize=initialize)
    raise ValueError(f"unknown store `{spec}`: use sqlite:PATH or redis://HOST:PORT/DB")


def _shown_store(spec: str) -> str:
    """The store spec to print: a Redis URL without its password."""
    if spec.startswith(("redis://", "rediss://")):
        from agentic_iam.core.store.redis import _safe_url

        return _safe_url(spec)
    return spec


def _redis_warnings(store: Any) -> list[str]:
    settings = store.persistence()
    if not settings:
        return ["could not read the server's persistence settings (CONFIG is disabled): make "
                "sure `appendonly yes` and `maxmemory-policy noeviction` are set"]
    return [f"{name} is `{settings.get(name)}`: {risk}"
            for name, (wanted, risk) in _REDIS_RISKS.items() if settings.get(name) != wanted]


@store_app.command("init")
@friendly
def store_init(
    store: StoreOpt = "sqlite:aiam-store.db",
    prefix: PrefixOpt = "aiam:",
    force: Annotated[bool, typer.Option(help="Replace an existing epoch (running clients adopt "
                                        "the new one, with a warning).")] = False,
) -> None:
    """Create the store's epoch, so that services may use it (after a state loss: a new one).

    Refuses when the store already has an epoch, unless --force.
    """
    from agentic_iam.errors import StoreStateLostError

    shown = _shown_store(store)
    try:
        backing = _shared_store(store, prefix)
    except StoreStateLostError:  # no SQLite file: create it, with its epoch
        created = _shared_store(store, prefix, initialize=True)
        console.print(f"created {shown} with epoch {created.epoch}", highlight=False)
        created.close()
        return
    try:
        old = backing.read_epoch()
        epoch = backing.init_epoch(force=force)
        if old is None:
            console.print(f"initialised {shown}: epoch {epoch}", highlight=False)
        else:
            console.print(f"replaced epoch {old} of {shown} with {epoch}", highlight=False)
        if store.startswith(("redis://", "rediss://")):
            for warning in _redis_warnings(backing):
                err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    finally:
        backing.close()


@store_app.command("status")
@friendly
def store_status(
    store: StoreOpt = "sqlite:aiam-store.db",
    prefix: PrefixOpt = "aiam:",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Show the store's epoch: exit 0 when it has one, 1 when it lost its state (or was never
    initialised); warn about Redis settings that can lose state."""
    from agentic_iam.errors import StoreStateLostError

    shown = _shown_store(store)
    report: dict[str, Any] = {"store": shown, "epoch": None, "warnings": []}
    try:
        backing = _shared_store(store, prefix)
    except StoreStateLostError as exc:
        report["problem"] = str(exc)
    else:
        try:
            report["epoch"] = backing.read_epoch()
            if store.startswith(("redis://", "rediss://")):
                report["prefix"] = prefix
                report["warnings"] = _redis_warnings(backing)
        finally:
            backing.close()
        if report["epoch"] is None:
            report["problem"] = ("no epoch: the store lost its state or was never initialised; "
                                 f"every call is denied until `aiam store init --store {shown}"
                                 + (f" --prefix {prefix}`" if prefix != "aiam:" else "`"))
    report["ok"] = report["epoch"] is not None
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        console.print(f"store  {shown}" + (f" (prefix {prefix})" if "prefix" in report else ""),
                      highlight=False)
        if report["ok"]:
            console.print(f"epoch  {report['epoch']}", highlight=False)
            console.print("state  [green]ok[/green]")
        else:
            console.print("epoch  none")
            console.print(f"state  [red]lost or never initialised[/red]: {report['problem']}",
                          highlight=False)
        for warning in report["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("init")
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="The project folder to create.")] = Path("."),
    agent: Annotated[str, typer.Option("--agent", help="The id of the sample agent (the "
                                       "`agent_id` you give `protect`).")] = "support-agent",
    force: Annotated[bool, typer.Option(help="Write into a folder that is not empty, "
                                        "overwriting the project files (keeps a key file).")]
    = False,
) -> None:
    """Write a working project: agents.yaml, policies/ (with tests), signing keys, aiam.yaml.

    Load it with `agentic_iam.load(DIR)`. Refuses a folder that is not empty unless --force.
    """
    from agentic_iam.project import init_project

    done = init_project(directory, agent_id=agent, force=force)
    where = done.directory
    console.print(f"wrote {len(done.files)} files in [bold]{where}[/bold]:", highlight=False)
    for name in done.files:
        console.print(f"  {name}", highlight=False)
    for name in done.kept:
        console.print(f"  {name} (kept)", highlight=False)
    console.print("\nnext, guard your agent (then run it inside `with iam.delegate(user, "
                  "purpose, capabilities):`):", highlight=False)
    console.print(f"  iam = agentic_iam.load({json.dumps(str(where))})", highlight=False,
                  markup=False)
    console.print(f"  agent = iam.protect(agent, agent_id={json.dumps(agent)})",
                  highlight=False, markup=False)
    shown = "" if str(where) == "." else f"cd {where} && "
    console.print(f"check the policies after each change: {shown}aiam policy test",
                  highlight=False, markup=False)


@app.command("demo")
@friendly
def demo(
    framework: Annotated[list[str] | None, typer.Option(
        "--framework", "-f", help="core, langchain, llama_index or openai_agents (repeatable) "
        "[default: every installed one].")] = None,
    audit: Annotated[Path | None, typer.Option(help="Write the audit log here "
                                               "[default: a temporary file].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Run Alice's refund story end to end, offline, through every installed adapter."""
    from agentic_iam.demo.run import main as demo_main

    raise typer.Exit(demo_main(framework, audit, as_json))


@app.command("bench")
@friendly
def bench() -> None:
    """Run every benchmark and print one table of ratios (takes a minute or two)."""
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        _fail("the benchmarks ship with the source checkout: run `python -m benchmarks` there")
    bench_main()


def _mount_optional() -> None:
    from agentic_iam.cli_audit import audit_app

    app.add_typer(audit_app, name="audit", help="Verify, show and export audit logs.")


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
